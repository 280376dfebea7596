"""Where a task's client CPU goes: ``push()`` and ``pop()`` + ``finish()`` under cProfile, grouped by package.

    python -m bench.cpu_profile [--tasks N]

cProfile runs with a CPU-time clock (``time.process_time``), so time spent waiting
for the server is not charged to whatever function awaited it. Profiling slows every
call, so the absolute figures are inflated; the shares are what to read.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from collections.abc import Awaitable, Callable

from beanie import init_beanie

from beanie_tasks.embedded import server_uri
from bench.cpu import CpuJob, backlog
from bench.ours import bench_database

# (what a file path contains, the group it is counted in), first match wins.
GROUPS = (
    ("beanie_tasks", "beanie-tasks"),
    ("/beanie/", "Beanie"),
    ("lazy_model", "Beanie (lazy_model)"),
    ("pydantic", "pydantic"),
    ("/pymongo/", "PyMongo"),
    ("/bson/", "bson"),
    ("asyncio", "asyncio"),
    ("selectors", "asyncio"),
)


def group_of(path: str) -> str:
    return next((group for needle, group in GROUPS if needle in path), "C built-ins" if path == "~" else "other")


async def profiled(tasks: int, action: Callable[[], Awaitable[None]]) -> pstats.Stats:
    profile = cProfile.Profile(time.process_time)
    profile.enable()
    for _ in range(tasks):
        await action()
    profile.disable()
    return pstats.Stats(profile)


def summary(name: str, stats: pstats.Stats, tasks: int, top: int = 15) -> str:
    groups: dict[str, float] = {}
    functions: list[tuple[float, float, str]] = []
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = stats.stats  # type: ignore[attr-defined]
    for (path, line, function), (_calls, _primitive, own, cumulative, _callers) in raw.items():
        groups[group_of(path)] = groups.get(group_of(path), 0.0) + own
        short = path.split("site-packages/")[-1]
        functions.append((own, cumulative, f"{short}:{line}({function})"))
    total = sum(groups.values())
    lines = [f"== {name}: {total / tasks * 1e6:.0f} µs of CPU per task under the profiler"]
    lines += [
        f"  {group:22s} {own / tasks * 1e6:7.0f} µs  {own / total:6.1%}"
        for group, own in sorted(groups.items(), key=lambda g: -g[1])
    ]
    lines.append("  most CPU in the function itself (µs per task, own / with callees):")
    for own, cumulative, where in sorted(functions, reverse=True)[:top]:
        lines.append(f"    {own / tasks * 1e6:6.0f} / {cumulative / tasks * 1e6:6.0f}  {where}")
    ours = sorted((f for f in functions if "beanie_tasks" in f[2]), key=lambda f: -f[1])[:top]
    lines.append("  beanie-tasks functions by CPU with callees (coroutines count once per resumption):")
    lines += [f"    {cumulative / tasks * 1e6:6.0f}  {where}" for _own, cumulative, where in ours]
    return "\n".join(lines)


async def main(uri: str, tasks: int) -> None:
    async with bench_database(uri) as db:
        await init_beanie(database=db, document_models=[CpuJob])
        await CpuJob().push()  # warm: the connection, the first model

        async def push() -> None:
            await CpuJob().push()

        print(summary("push()", await profiled(tasks, push), tasks))
        await CpuJob.collection().delete_many({})
        await backlog(tasks)

        async def pop_finish() -> None:
            task = await CpuJob.pop()
            if task is None:
                raise RuntimeError("the backlog ran out")
            await task.finish()

        print(summary("pop() + finish()", await profiled(tasks, pop_finish), tasks))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_profile", description=__doc__)
    parser.add_argument("--tasks", type=int, default=300)
    args = parser.parse_args()
    with server_uri() as uri:
        asyncio.run(main(uri, args.tasks))
