"""The benchmark harness: start (or find) a server, run every workload, write the report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import platform
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from beanie_tasks.embedded import EmbeddedServer
from bench import cpu, idle, ours, peers, waiters
from bench.links_report import write_large
from bench.memory import measure_memory
from bench.report import write_report

RESULTS = Path(__file__).resolve().parent / "results"
# `--links-large`: fan-outs and fan-ins of 100 (the `make bench` size, for comparison in the same run), 1,000 and
# 10,000 (a fan-in over MAX_LINKS_PER_TASK is reported as refused). About 8 minutes on the bundled server.
LARGE_LINK_FANS = ((100, 100), (1_000, 1_000), (10_000, 10_000))
SECTIONS = (
    "commands", "batch", "push_many", "cpu", "throughput", "latency", "scaling", "links", "idle", "waiters", "memory",
)  # fmt: skip


@dataclass(frozen=True)
class Sizes:
    """How big each workload is; ``quick`` trades precision for a run of a minute or two."""

    # Throughput repetitions: the CPU section (below) measures the library's own cost against the raw loop
    # more precisely; two repetitions keep `make bench` within its ten minutes.
    repetitions: int = 2
    throughput_tasks: int = 40
    concurrencies: tuple[int, ...] = (1, 4, 16)
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    batch_concurrency: int = 4
    command_repeat: int = 5
    dependency_links: tuple[int, ...] = (1, 3, 10)
    latency_samples: int = 20
    scaling_sizes: tuple[int, ...] = (100, 1_000, 10_000)
    scaling_claims: int = 3
    # Fed to the worker in waves (bench/memory.py), so the collection stays small.
    memory_tasks: int = 10_000
    # Keeps `make bench` within its ~10 minutes on a loaded machine; a run cut short says so.
    memory_budget_seconds: float = 150.0
    memory_concurrency: int = 16
    # Dependency fan-out (dependents of one task) and fan-in (tasks one dependent waits for); `--links-large`
    # runs LARGE_LINK_FANS in a run of its own.
    link_fans: tuple[tuple[int, int], ...] = ((100, 100),)
    # Client CPU per task: rounds of ours and the raw loop, alternating; tasks per round. push() and
    # pop() + finish() are cheap to repeat and their ratios close to their targets: more rounds.
    cpu_rounds: int = 4
    cpu_path_rounds: int = 9
    cpu_tasks: int = 100
    cpu_worker_tasks: int = 100
    # The peers' own rounds (each peer runs them in one subprocess; their collection grows across rounds).
    cpu_peer_rounds: int = 3
    idle_seconds: float = 10.0
    waiters: int = 1_000
    waiter_pushes: int = 20
    # Independent tasks per push_many call (the target is stated for 1,000).
    push_many_tasks: int = 1_000
    push_many_repetitions: int = 5

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            repetitions=1,
            throughput_tasks=30,
            command_repeat=2,
            latency_samples=8,
            scaling_sizes=(100, 1_000),
            memory_tasks=1_000,
            memory_budget_seconds=120.0,
            link_fans=((100, 100),),
            cpu_rounds=2,
            cpu_path_rounds=2,
            cpu_tasks=40,
            cpu_worker_tasks=40,
            cpu_peer_rounds=2,
            idle_seconds=3.0,
            waiter_pushes=10,
            push_many_repetitions=3,
        )


@dataclass
class Results:
    """Everything one run measured; ``report.py`` turns it into tables and a plot."""

    mode: str
    sizes: Sizes
    server: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)
    commands: dict[str, Any] = field(default_factory=dict)
    batch: dict[int, dict[str, Any]] = field(default_factory=dict)
    throughput: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    latency: dict[str, list[float]] = field(default_factory=dict)
    scaling: list[dict[str, Any]] = field(default_factory=list)
    memory: Any = None
    links: list[dict[str, Any]] = field(default_factory=list)
    push_many: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, Any] = field(default_factory=dict)
    idle: list[dict[str, Any]] = field(default_factory=list)
    waiters: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    section_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


class Progress:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def server(progress: Progress) -> Iterator[tuple[str, str]]:
    """``MONGODB_URI`` when set, else a bundled SecantusDB for the run; yields (uri, label)."""
    configured = os.environ.get("MONGODB_URI")
    if configured:
        yield configured, "MONGODB_URI"
        return
    progress.say("starting the bundled SecantusDB server")
    with EmbeddedServer() as embedded:
        yield embedded.uri, "SecantusDB (bundled, started by the harness)"


async def guarded(results: Results, name: str, progress: Progress, work: Callable[[], Awaitable[None]]) -> None:
    """Run one section; a failure is recorded in the report instead of ending the run."""
    progress.say(f"{name} ...")
    started = time.monotonic()
    try:
        await work()
    except Exception as exc:
        results.errors[name] = f"{type(exc).__name__}: {exc}"
        progress.say(f"{name} FAILED: {exc}")
        traceback.print_exc()
    finally:
        results.section_seconds[name] = time.monotonic() - started


async def run(args: argparse.Namespace) -> Results:
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.memory_tasks is not None:
        sizes = dataclasses.replace(sizes, memory_tasks=args.memory_tasks)
    if args.memory_budget is not None:
        sizes = dataclasses.replace(sizes, memory_budget_seconds=args.memory_budget)
    if args.idle_seconds is not None:
        sizes = dataclasses.replace(sizes, idle_seconds=args.idle_seconds)
    if args.links_large:
        sizes = dataclasses.replace(sizes, link_fans=LARGE_LINK_FANS)
    results = Results(mode="links-large" if args.links_large else "quick" if args.quick else "full", sizes=sizes)
    progress = Progress()
    wanted = {"links"} if args.links_large else set(args.only or SECTIONS)
    results.machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_start": load_average(),
    }
    peer_python = None
    if not args.no_peers and not args.links_large:
        try:
            peer_python = Path(args.peers_python) if args.peers_python else peers.peers_python()
        except Exception as exc:
            results.errors["peers"] = f"could not set up the peers' environment: {exc}"
            progress.say(results.errors["peers"])
    with server(progress) as (uri, label):
        results.server = {"label": label} | await ours.server_description(uri)
        progress.say(f"server: {label}, version {results.server['version']}")
        if peer_python is not None:
            for system in peers.SYSTEMS:
                results.peers[system] = await peers.run_peer(peer_python, system, "info", uri)

        async def run_peer(system: str, workload: str, *options: str) -> Any:
            if peer_python is None:
                raise RuntimeError("no peers environment")
            return await peers.run_peer(peer_python, system, workload, uri, *options)

        async def peer_throughput(system: str, concurrency: int) -> float:
            options = ("--tasks", str(sizes.throughput_tasks), "--concurrency", str(concurrency))
            return float((await run_peer(system, "throughput", *options))["per_second"])

        async def commands() -> None:
            results.commands["beanie-tasks"] = await ours.commands_independent(uri, sizes.command_repeat)
            results.commands["raw driver floor"] = await ours.commands_floor(uri, sizes.command_repeat)
            for system in results.peers:
                name = results.peers[system]["name"]
                results.commands[name] = await run_peer(system, "commands", "--repeat", str(sizes.command_repeat))
            for links in sizes.dependency_links:
                key = f"beanie-tasks, {links} ALL_OF dependencies"
                if not ours.dependencies_available():
                    results.commands[key] = {"pending": "beanie_tasks.dependencies is not available yet"}
                    continue
                try:
                    results.commands[key] = await ours.commands_with_dependencies(uri, links)
                except Exception as exc:
                    results.commands[key] = {"pending": f"{type(exc).__name__}: {exc}"}

        async def batch() -> None:
            for k in sizes.batch_sizes:
                results.batch[k] = await ours.commands_batch(uri, k, rounds=2)
                results.batch[k]["per_second"] = []
            for _ in range(sizes.repetitions):
                for k in sizes.batch_sizes:
                    rate = await ours.throughput_batch(uri, sizes.throughput_tasks, sizes.batch_concurrency, k)
                    results.batch[k]["per_second"].append(rate)

        async def push_many() -> None:
            results.push_many = await ours.push_many_cost(uri, sizes.push_many_tasks, sizes.push_many_repetitions)

        async def throughput() -> None:
            systems: dict[str, Callable[[int], Awaitable[float]]] = {
                "raw driver floor": lambda c: ours.throughput_floor(uri, sizes.throughput_tasks, c),
                "raw driver, beanie-tasks' documents and writes": lambda c: ours.throughput_floor(
                    uri, sizes.throughput_tasks, c, like_beanie_tasks=True
                ),
                "beanie-tasks": lambda c: ours.throughput_ours(uri, sizes.throughput_tasks, c),
            }
            for system, info in results.peers.items():
                systems[info["name"]] = lambda c, s=system: peer_throughput(s, c)  # type: ignore[misc]
            for repetition in range(sizes.repetitions):
                for concurrency in sizes.concurrencies:
                    for name, measure in systems.items():
                        rate = await measure(concurrency)
                        results.throughput.setdefault(name, {}).setdefault(concurrency, []).append(rate)
                progress.say(f"throughput repetition {repetition + 1}/{sizes.repetitions} done")

        async def latency() -> None:
            results.latency["beanie-tasks (change stream)"] = await ours.latency_ours(
                uri, sizes.latency_samples, change_stream=True
            )
            results.latency["beanie-tasks (polling)"] = await ours.latency_ours(
                uri, sizes.latency_samples, change_stream=False
            )
            for system, info in results.peers.items():
                answer = await run_peer(system, "latency", "--samples", str(sizes.latency_samples))
                results.latency[info["name"]] = answer["seconds"]

        async def scaling() -> None:
            for queued in sizes.scaling_sizes:
                results.scaling.append(await ours.scaling(uri, queued, sizes.scaling_claims))
                progress.say(f"scaling at {queued} queued tasks done")

        async def links() -> None:
            for fan_out, fan_in in sizes.link_fans:
                results.links.append(await ours.links_fan(uri, fan_out, fan_in))
                progress.say(f"links: fan-out {fan_out}, fan-in {fan_in} done")

        async def cpu_per_task() -> None:
            results.cpu = await cpu.measure_cpu(
                uri,
                rounds=sizes.cpu_rounds,
                path_rounds=sizes.cpu_path_rounds,
                tasks=sizes.cpu_tasks,
                worker_tasks=sizes.cpu_worker_tasks,
                concurrencies=sizes.concurrencies,
                progress=progress.say,
            )
            results.cpu["peers"] = {}
            results.cpu["peer_rounds"] = sizes.cpu_peer_rounds
            for system, info in results.peers.items():
                options = ("--tasks", str(sizes.cpu_tasks), "--rounds", str(sizes.cpu_peer_rounds))
                results.cpu["peers"][info["name"]] = await run_peer(system, "cpu", *options)

        async def idle_commands() -> None:
            results.idle = await idle.measure_idle(uri, sizes.idle_seconds)

        async def many_waiters() -> None:
            results.waiters = await waiters.measure_waiters(uri, sizes.waiters, sizes.waiter_pushes)

        async def memory() -> None:
            # A fresh bundled server: the history the earlier sections leave behind slows the shared one for a
            # worker watching a change stream (about half the rate in our runs). MONGODB_URI is used as it is.
            with contextlib.ExitStack() as stack:
                own_uri = uri
                if label != "MONGODB_URI":
                    own_uri = stack.enter_context(EmbeddedServer()).uri
                results.memory = await measure_memory(
                    own_uri, sizes.memory_tasks, sizes.memory_concurrency, sizes.memory_budget_seconds
                )

        work = {
            "commands": commands,
            "batch": batch,
            "push_many": push_many,
            "cpu": cpu_per_task,
            "throughput": throughput,
            "latency": latency,
            "scaling": scaling,
            "links": links,
            "idle": idle_commands,
            "waiters": many_waiters,
            "memory": memory,
        }
        for name in SECTIONS:
            if name in wanted:
                await guarded(results, name, progress, work[name])
    results.seconds = time.monotonic() - progress.started
    results.machine["load_end"] = load_average()
    return results


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages (other work on the machine skews every rate)."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition (a minute or two)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--no-peers", action="store_true", help="skip the peer queues (no extra virtualenv)")
    parser.add_argument("--peers-python", help="use this interpreter for the peers instead of .venv/bench-peers")
    parser.add_argument(
        "--memory-tasks", type=int, help="tasks the memory run works through (default 10,000; 1,000 quick)"
    )
    parser.add_argument(
        "--memory-budget", type=float, help="seconds after which the memory run stops early (default 150; 120 quick)"
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        help="seconds each idle layout is counted (default 10; 3 quick); 120 or more takes in the worker's "
        "slower periodic commands (a safety-net claim every 6 rounds, its registry entry every 20 s)",
    )
    parser.add_argument(
        "--links-large",
        action="store_true",
        help="only the links section, at 100, 1,000 and 10,000 (about 8 minutes on the bundled server): writes "
        "links-large.md and .json, and shows them in section 7 of latest.md",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="where latest.md and latest.png (or links-large.md) go"
    )
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    if args.links_large:
        written = f"{write_large(results, args.out)}"
    else:
        markdown, plot = write_report(results, args.out)
        written = f"{markdown} and {plot}"
    print(f"bench: wrote {written} in {results.seconds:.0f}s", file=sys.stderr)
    if results.errors:
        print(f"bench: sections with errors: {', '.join(results.errors)}", file=sys.stderr)
        sys.exit(1)
