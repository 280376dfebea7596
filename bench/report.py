"""Turn one run's measurements into ``latest.md`` (tables) and ``latest.png`` (a plot)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pymongo

import beanie_tasks
from beanie_tasks.task import Task
from bench.links_report import links_section, read_large
from bench.markdown import load, number, table
from bench.memory import SAMPLE_EVERY, WAVE
from bench.stats import Latency, Spread

if TYPE_CHECKING:
    from bench.run import Results

FLOOR = "raw driver floor"
OPS = ("push", "claim", "finish", "fail")

# Issue 14's targets: client CPU per task against the raw loop on the same documents and commands.
CPU_TARGETS = {"push": 1.15, "pop_finish": 1.1}
WORKER_CPU_TARGET = (16, 1.25)  # (concurrency, ratio to the raw claim + finish loop)
BATCHED_COMMANDS_TARGET = 0.5  # commands per task at concurrency 16, with batched claims
LEAN_COMMANDS_TARGET = 2.1  # commands per task while draining, with lean change streams
IDLE_TARGET = 1.0  # commands per second, however many classes


def op_cell(op: dict[str, Any] | None) -> str:
    if not op:
        return "-"
    names = ", ".join(f"{n} {number(c)}" if c != 1 else n for n, c in sorted(op["by_name"].items()))
    return f"{number(op['total'])} ({names})" if names else number(op["total"])


def commands_section(results: Results) -> str:
    rows = []
    for system, ops in results.commands.items():
        if "pending" in ops:
            rows.append([system, *(["pending"] * 5), ops["pending"]])
            continue
        hot = ops["claim"]["total"] + ops["finish"]["total"]
        extra = f"a dependency's finish: {op_cell(ops['dependency finish'])}" if "dependency finish" in ops else ""
        rows.append([system, *(op_cell(ops.get(op)) for op in OPS), number(hot), extra])
    ours = results.commands.get("beanie-tasks")
    verdict = ""
    if ours and "pending" not in ours:
        push_ok = ours["push"]["total"] <= 1
        hot_ok = ours["claim"]["total"] + ours["finish"]["total"] <= 2
        verdict = (
            f"\n\nTargets: 1 command per push ({'met' if push_ok else 'MISSED'}), "
            f"2 for claim + finish of an independent task ({'met' if hot_ok else 'MISSED'})."
        )
    return (
        "## 1. Commands per task\n\n"
        "Counted with PyMongo's `CommandListener` (handshakes and heartbeats left out), averaged over "
        f"{results.sizes.command_repeat} tasks per row. These counts do not depend on the server.\n\n"
        + table(["system", "push", "claim", "finish", "fail", "claim + finish", "notes"], rows)
        + verdict
    )


def batch_section(results: Results) -> str:
    floor = results.throughput.get(FLOOR, {}).get(results.sizes.batch_concurrency)
    rows = []
    for k, row in sorted(results.batch.items()):
        total = row["claim"] + row["ack"]
        rate = Spread.of(row["per_second"]) if row.get("per_second") else None
        ratio = f"{rate.median / Spread.of(floor).median:.2f}x" if rate and floor else "-"
        names = ", ".join(f"{n} {c}" for n, c in sorted(row["claim_by_name"].items()))
        rows.append(
            [k, number(row["claim"]), number(row["ack"]), number(total), names, rate.show() if rate else "-", ratio]
        )
    k16 = results.batch.get(16)
    verdict = ""
    if k16:
        total = k16["claim"] + k16["ack"]
        met = "met" if total <= 0.5 else "MISSED"
        verdict = f"\n\nTarget: at most 0.5 commands per task at k = 16: {number(total)}, {met}."
    return (
        "## 2. Batched claim (`beanie_tasks.batch`)\n\n"
        "`claim_batch(Task, k)` = find of candidate ids in claim order + `update_many` guarded by state and due time "
        "with a fresh lease token + find by id and token; `finish_batch` = one `bulk_write`, each update guarded by "
        f"its task's lease. Throughput: {results.sizes.throughput_tasks} tasks drained by "
        f"{results.sizes.batch_concurrency} concurrent batch consumers, tasks/s, median (min-max) of "
        f"{results.sizes.repetitions} run(s); the ratio is against the raw-driver floor at the same concurrency.\n\n"
        + table(
            [
                "k",
                "claim cmds/task",
                "ack cmds/task",
                "total cmds/task",
                "claim commands (2 rounds)",
                "tasks/s",
                "vs floor",
            ],
            rows,
        )
        + verdict
    )


def throughput_section(results: Results) -> str:
    concurrencies = results.sizes.concurrencies
    floor = results.throughput.get(FLOOR, {})
    rows = []
    for system, by_c in results.throughput.items():
        cells = []
        for c in concurrencies:
            runs = by_c.get(c)
            if not runs:
                cells.append("-")
                continue
            spread = Spread.of(runs)
            ratio = f" · {spread.median / Spread.of(floor[c]).median:.2f}x" if c in floor and system != FLOOR else ""
            cells.append(spread.show() + ratio)
        rows.append([system, *cells])
    return (
        "## 3. Throughput (no-op handler)\n\n"
        f"{results.sizes.throughput_tasks} tasks are pushed, then C consumers (coroutines on one event loop, one "
        "client) drain them: claim, run nothing, finish. Tasks per second, median (min-max) of "
        f"{results.sizes.repetitions} run(s), then the ratio to the raw-driver floor (`find_one_and_update` + "
        '`update_one` on bare three-field documents, one index) measured in the same run. The row "raw driver, '
        "beanie-tasks' documents and writes\" runs that loop on the collection beanie-tasks sets up (all its "
        "indexes), over its documents, sending the very updates `pop()` and `finish()` send: beanie-tasks against "
        "that row is the library's own client-side cost; that row against the bare floor is what the server charges "
        "for richer documents, writes and indexes. **Server-dependent**: on the bundled server "
        "every claim scans the collection, so these figures are far below what MongoDB does; compare the ratios, "
        "not the absolute rates.\n\n" + table(["system", *(f"C = {c}" for c in concurrencies)], rows)
    )


def latency_section(results: Results) -> str:
    wakeup = {
        "beanie-tasks (change stream)": "change stream (`queue()` default)",
        "beanie-tasks (polling)": f"polling with backoff 0.05 → {Task.task_options.poll_interval:g} s",
    }
    for info in results.peers.values():
        wakeup[info["name"]] = f"default: {info['poll']}"
    rows = []
    for system, seconds in results.latency.items():
        if not seconds:
            continue
        lat = Latency.of(seconds)
        rows.append(
            [
                system,
                wakeup.get(system, ""),
                f"{lat.p50 * 1000:.0f}",
                f"{lat.p95 * 1000:.0f}",
                f"{lat.p99 * 1000:.0f}",
                lat.samples,
            ]
        )
    return (
        "## 4. Enqueue-to-start latency\n\n"
        "An idle consumer in each library's own waiting loop; a producer in the same process pushes one task at a "
        "time after a random pause of 0.05-0.6 s (the same seeded pauses for every system) and waits until it has "
        "started. Milliseconds from push to the handler seeing the task (nearest-rank percentiles; with few samples "
        "p99 is the maximum).\n\n" + table(["system", "wake-up", "p50 ms", "p95 ms", "p99 ms", "samples"], rows)
    )


def scaling_section(results: Results) -> str:
    rows = []
    for row in results.scaling:
        millis = Spread.of(row["millis"])
        planner, hinted = row["planner"], row["hinted"]
        rows.append(
            [
                f"{row['queued']:,}",
                number(row["commands"]),
                f"`{row.get('claim_hint', '?')}`",
                millis.show(1),
                f"`{hinted['plan']}`",
                "yes" if hinted["sort_stage"] else "no",
                hinted["keys_examined"],
                hinted["docs_examined"],
                f"`{planner['plan']}`",
                f"{planner['keys_examined']} / {planner['docs_examined']}",
            ]
        )
    return (
        "## 5. Scaling: claim cost against queue size\n\n"
        f"N tasks queued, then {results.sizes.scaling_claims} claims (`pop()`), each timed and counted. `pop()` sends "
        '`hint: bt_claim` with every claim (the column "hint sent" is read from the `findAndModify` it sent), so the '
        "plan it runs is the hinted one on every server. That claim is explained with `executionStats`, with the hint "
        "and, for comparison, without it (what the server's planner would pick by itself). **Commands per claim, the "
        "index used and the absence of a SORT stage do not depend on the server. Milliseconds and keys/docs examined "
        "do**: the bundled SecantusDB, even hinted, walks the whole index range (it does not stop after the first "
        "key), so its claim time grows linearly with the queue. On MongoDB the hinted claim is "
        "`LIMIT <- FETCH <- IXSCAN(bt_claim)`, with no SORT stage, and keys examined ≈ 1 whatever the queue size; run "
        "with `MONGODB_URI` set to see it.\n\n"
        + table(
            [
                "queued",
                "commands/claim",
                "hint sent",
                "ms/claim",
                "claim's plan (hinted)",
                "SORT stage",
                "keys examined",
                "docs examined",
                "planner's choice without the hint",
                "keys / docs examined without the hint",
            ],
            rows,
        )
    )


# Flat: RSS fitted to grow by less than this per 1,000 tasks (16 bytes a task; RSS moves in 4 KiB pages).
FLAT_KIB_PER_1000 = 16.0


def memory_section(results: Results) -> str:
    run = results.memory
    if run is None:
        return "## 6. Memory\n\nNot measured in this run."
    rows = [
        [
            f"{run.tasks:,}",
            run.concurrency,
            run.most_queued,
            f"{run.warm_mib:.1f}",
            f"{run.final_mib:.1f}",
            f"{run.peak_mib:.1f}",
            f"{run.growth_kib_per_1000:+.1f}",
            f"{(run.final_mib - run.warm_mib) * 1024:+.0f}",
            f"{run.seconds:.0f}",
            f"{run.tasks / run.seconds:.0f}" if run.seconds else "-",
        ]
    ]
    peaks = ", ".join(f"{end:,}: {rss:.2f}" for end, rss in run.window_peaks())
    flat = abs(run.growth_kib_per_1000) < FLAT_KIB_PER_1000
    verdict = (
        f"flat (fitted growth under {FLAT_KIB_PER_1000:g} KiB per 1,000 tasks)"
        if flat
        else f"GROWS by {run.growth_kib_per_1000:+.0f} KiB per 1,000 tasks"
    )
    if run.tasks < 5000:
        verdict += " (a short run: one-off allocations after start-up weigh heavily in the slope)"
    return (
        "## 6. Memory: RSS of a consumer process\n\n"
        f"A separate process runs `beanie_tasks.Worker` with concurrency {run.concurrency} over a task whose `run()` "
        "does nothing (`bench/memory_worker.py`), against a fresh bundled server of its own (the history the "
        "earlier sections leave behind slows the shared one for a worker watching a change stream; with "
        f"`MONGODB_URI` set, that server). The tasks are fed in waves: the harness pushes {WAVE} at a time "
        f"whenever fewer than concurrency + {WAVE} are unfinished (so at most {run.concurrency + 2 * WAVE - 1} are "
        f"ever in the collection, waiting or running), and deletes finished tasks every {SAMPLE_EVERY:g} s, so the "
        "collection stays small (the bundled server scans it) and what grows is only the count of tasks the worker "
        f"has run. The worker's RSS is sampled with psutil every {SAMPLE_EVERY:g} s; the peak is the kernel's `VmHWM`. "
        "Growth is the least-squares slope of RSS "
        "against tasks done, from the first 10% of tasks (once imports and connection pools have settled) to the end. "
        "RSS moves in whole 4 KiB pages.\n\n"
        + table(
            [
                "tasks",
                "concurrency",
                "most tasks in the collection",
                "RSS after 10% (MiB)",
                "final RSS (MiB)",
                "peak RSS (MiB)",
                "growth, fitted (KiB per 1,000 tasks)",
                "final - after 10% (KiB)",
                "seconds",
                "tasks/s",
            ],
            rows,
        )
        + (
            f"\n\n**Cut short**: the time budget of {results.sizes.memory_budget_seconds:g} s ran out after "
            f"{run.tasks:,} of the {run.planned:,} planned tasks (the machine was busy; "
            "`python -m bench --only memory --memory-budget 3600` runs them all)."
            if run.tasks < run.planned
            else ""
        )
        + f"\n\nHighest RSS sampled in each window of {run.window:,} tasks (MiB, by tasks done at the window's "
        f"end): {peaks}.\n\nVerdict: {verdict}."
    )


def systems_section(results: Results) -> str:
    rows = [
        [
            "beanie-tasks",
            beanie_tasks.__version__,
            f"change stream; else polling with backoff up to {Task.task_options.poll_interval:g} s",
            "main `.venv`",
        ],
        [FLOOR, f"pymongo {pymongo.__version__}", "n/a (drain loop)", "main `.venv`"],
    ]
    rows += [[info["name"], info["version"], info["poll"], "`.venv/bench-peers`"] for info in results.peers.values()]
    return "## Systems\n\n" + table(["system", "version", "default wake-up / poll interval", "environment"], rows)


# The bulk push target: commands per task for 1,000 independent tasks.
PUSH_MANY_TARGET = 0.01


def push_many_section(results: Results) -> str:
    run = results.push_many
    if not run:
        return "## 11. Bulk push (`push_many`)\n\nNot measured in this run."
    micros = {
        name: Spread.of([seconds * 1e6 for seconds in run[name]]) for name in run if name.endswith(("cpu", "wall"))
    }
    names = ", ".join(f"{name} {number(count)}" for name, count in sorted(run["commands_by_name"].items()))
    ratio = micros["ours_cpu"].median / micros["raw_cpu"].median if micros["raw_cpu"].median else float("nan")
    rows = [
        ["`BenchJob.push_many(tasks)`", f"{run['commands_per_task']:.3f} ({names})", micros["ours_cpu"].show(1),
         micros["ours_wall"].show(1), f"{ratio:.2f}x"],
        ["raw `insert_many` of the same documents", f"{1 / run['tasks']:.3f} (insert 1)", micros["raw_cpu"].show(1),
         micros["raw_wall"].show(1), "1x"],
    ]  # fmt: skip
    met = "met" if run["commands_per_task"] <= PUSH_MANY_TARGET else "MISSED"
    return (
        "## 11. Bulk push (`push_many`)\n\n"
        f"{run['tasks']:,} independent tasks pushed with one `push_many` call (one unordered `insert_many` per chunk "
        "of 1,000), then the very documents it stored inserted again, with fresh ids, by a raw PyMongo "
        "`insert_many` into a collection of their own with the same indexes; median (min-max) of "
        f"{len(run['ours_cpu'])} run(s). The tasks are built before the clock starts, as a raw caller's documents "
        "are, so the gap in client CPU is "
        "what `push_many` adds: validation, the stored form, the outcome per task. Client CPU is this process's "
        "(`time.process_time`; the server is another process); commands per task do not depend on the server, "
        "wall time does.\n\n"
        + table(["system", "commands / task", "client CPU µs / task", "wall µs / task", "CPU vs raw"], rows)
        + f"\n\nTarget: at most {PUSH_MANY_TARGET:g} commands per task for 1,000 independent tasks: "
        f"{run['commands_per_task']:.3f}, {met}."
    )


def verdict(value: float, target: float) -> str:
    return "met" if value <= target else "MISSED"


def ratios(ours: list[float], raw: list[float]) -> Spread:
    """Per-round ratios: each round's pair was measured back to back, so a noisy moment hits both."""
    return Spread.of([mine / theirs for mine, theirs in zip(ours, raw, strict=False) if theirs])


def times(ratio: Spread) -> str:
    """``1.25x (1.20-1.30)``: the median ratio, then the spread of the rounds."""
    if ratio.runs == 1 or ratio.low == ratio.high:
        return f"{ratio.median:.2f}x"
    return f"{ratio.median:.2f}x ({ratio.low:.2f}-{ratio.high:.2f})"


def microseconds(values: list[float]) -> str:
    return Spread.of(values).show(0) if values else "-"


def cpu_section(results: Results) -> str:
    run = results.cpu
    if not run:
        return "## 8. Client CPU per task\n\nNot measured in this run."
    rows = []
    for key, label in (("push", "`push()`"), ("pop_finish", "`pop()` + `finish()`")):
        pair = run[key]
        ratio = ratios(pair["ours"], pair["raw"])
        target = CPU_TARGETS[key]
        rows.append(
            [
                label,
                microseconds(pair["ours"]),
                microseconds(pair["raw"]),
                times(ratio),
                f"{target:g}x",
                verdict(ratio.median, target),
            ]
        )
        if key == "push" and pair.get("built"):
            rows.append(
                [
                    "raw `insert_one` after building the model (`CpuJob()`), no `push()`",
                    "-",
                    microseconds(pair["built"]),
                    times(ratios(pair["built"], pair["raw"])),
                    "-",
                    "-",
                ]
            )
    target_c, target_ratio = WORKER_CPU_TARGET
    for concurrency, pair in sorted(run.get("worker", {}).items()):
        ratio = ratios(pair["ours"]["cpu_us"], pair["raw"]["cpu_us"])
        has_target = int(concurrency) == target_c
        rows.append(
            [
                f"`Worker`, concurrency {concurrency}, draining a backlog (raw: {concurrency} claim + finish loops)",
                microseconds(pair["ours"]["cpu_us"]),
                microseconds(pair["raw"]["cpu_us"]),
                times(ratio),
                f"{target_ratio:g}x" if has_target else "-",
                verdict(ratio.median, target_ratio) if has_target else "-",
            ]
        )
    raw_push = Spread.of(run["push"]["raw"]).median
    raw_hot = Spread.of(run["pop_finish"]["raw"]).median
    for name, peer in run.get("peers", {}).items():
        for key, label, floor in (("push", "push", raw_push), ("claim_finish", "claim + finish", raw_hot)):
            values = peer.get(key) or []
            versus = f"{Spread.of(values).median / floor:.2f}x of our raw loop" if values else "-"
            rows.append([f"{name}: {label} (Motor)", microseconds(values), "-", versus, "-", "-"])
    mirror = run.get("mirror_differences")
    if mirror:
        mirror_text = "**The raw loop's commands differ from the library's**: " + "; ".join(mirror) + "."
    else:
        mirror_text = (
            "Before timing, one claim + finish was sent each way and the commands compared field by field "
            "(names and BSON types, values aside): the raw loop sends exactly the shape beanie-tasks sends."
        )
    return (
        "## 8. Client CPU per task\n\n"
        "CPU time of the client process only (`time.process_time()`; the server is a separate process), divided by "
        f"the tasks: {run.get('path_rounds', run['rounds'])} round(s) of {run['tasks']} tasks for push and pop + "
        f"finish, {run['rounds']} of {run['worker_tasks']} for the worker; "
        "beanie-tasks and the raw PyMongo loop alternating (which goes first alternates too). Microseconds per task, "
        "median (min-max) over the rounds; the ratio is the median (min-max) of each round's ratio. Within a round, "
        "push and pop + finish alternate with their raw loop in chunks of 10 tasks, in one database. The raw push "
        "inserts copies (fresh `_id`) of the very document `push()` stored; the raw claim + finish sends the same "
        "`findAndModify` filter, sort, hint and fields as `beanie_tasks.store`'s claim and the same finish. The "
        "worker drains a backlog released all at once after it has gone idle (start-up not counted); the raw row "
        "runs C claim + finish coroutines over the same backlog. Peers run in their own environment (Motor, not "
        f"PyMongo's async client), measured the same way ({run.get('peer_rounds', run['rounds'])} rounds of "
        f"{run['tasks']} tasks each); their ratio is to our raw loop, so it includes the driver's difference. "
        f"{mirror_text} Method: `docs/performance.md`.\n\n"
        + table(["path", "beanie-tasks µs/task", "raw loop µs/task", "ratio", "target", "verdict"], rows)
        + "\n\n"
        + model_share(run["push"])
        + worker_commands_table(results)
    )


def model_share(push: dict[str, list[float]]) -> str:
    """How much of push()'s gap over the raw insert is building the model, which the raw loop never does."""
    if not push.get("built"):
        return ""
    ours, raw, built = (Spread.of(push[side]).median for side in ("ours", "raw", "built"))
    gap = ours - raw
    if gap <= 0:
        return ""
    return (
        f"Of `push()`'s {gap:.0f} µs over the raw insert, building the model (`CpuJob()`, pydantic validation "
        f"of every field, which the raw loop inserting a ready dict never pays) accounts for {built - raw:.0f} µs "
        f"({(built - raw) / gap:.0%}); the rest, {ours - built:.0f} µs, is `push()`'s own work. "
        "Within 1.15x the raw insert, that is, the model's validation and `push()` together, would take a push "
        "that skips the validation of a typed model (a dict API); see `docs/performance.md`, section 8.\n\n"
    )


def by_name(counts: dict[str, float]) -> str:
    return ", ".join(f"{name} {number(count)}" for name, count in sorted(counts.items())) or "-"


def worker_commands_table(results: Results) -> str:
    rows = []
    worker = results.cpu.get("worker", {})
    for concurrency, pair in sorted(worker.items()):
        ours, raw = pair["ours"]["commands_per_task"], pair["raw"]["commands_per_task"]
        rows.append([concurrency, number(sum(ours.values())), by_name(ours), number(sum(raw.values())), by_name(raw)])
    lines = ["Commands per task while draining (summed over the rounds, by name):", ""]
    lines.append(table(["concurrency", "Worker", "Worker, by name", "raw loop", "raw loop, by name"], rows))
    at16 = worker.get(16)
    if at16:
        total = sum(at16["ours"]["commands_per_task"].values())
        lines += [
            "",
            f"Targets at concurrency 16: at most {BATCHED_COMMANDS_TARGET:g} commands per task with batched claims "
            f"({number(total)}: {verdict(total, BATCHED_COMMANDS_TARGET)}); at most {LEAN_COMMANDS_TARGET:g} with "
            f"lean change streams ({verdict(total, LEAN_COMMANDS_TARGET)}).",
        ]
        work = total - at16["ours"]["commands_per_task"].get("getMore", 0.0)
        if total > BATCHED_COMMANDS_TARGET >= work:
            lines += [
                "",
                f"The claims and finishes alone are {number(work)} per task (met); the rest are the wake-up stream's "
                "`getMore`s, which the server answered after writes its filter drops. A MongoDB server answers a "
                "waiting `getMore` only when a matching change arrives or `maxAwaitTimeMS` passes "
                "(see `docs/performance.md`, section 8).",
            ]
    return "\n".join(lines)


def idle_section(results: Results) -> str:
    rows = []
    for row in results.idle:
        total = row["total_per_second"]
        rows.append(
            [
                row["layout"],
                row["classes"],
                row["collections"],
                f"{row['seconds']:.0f}",
                number(total),
                by_name(row["per_second"]),
                verdict(total, IDLE_TARGET),
            ]
        )
    return (
        "## 9. Idle commands per second\n\n"
        "A `Worker` with its defaults and nothing to do; its start-up is left out (counting starts once it has sent "
        "nothing but getMores for a moment), then every command it sends is counted, by name. Four classes share "
        "one collection through Beanie inheritance, or have a collection each. A window of a few maintenance "
        "rounds shows the probe and the stream; the worker's slower periodic commands (a safety-net claim per "
        "class every 6 rounds, its registry entry every 20 s) need `--idle-seconds 120`. Target: at most "
        f"{IDLE_TARGET:g} command per second, however many classes.\n\n"
        + table(["worker runs", "classes", "collections", "seconds", "commands/s", "by name", "target"], rows)
    )


def milliseconds(seconds: list[float]) -> list[str]:
    if not seconds:
        return ["-", "-", "-", "0"]
    lat = Latency.of(seconds)
    return [f"{lat.p50 * 1000:.1f}", f"{lat.p95 * 1000:.1f}", f"{max(seconds) * 1000:.1f}", str(lat.samples)]


def waiters_section(results: Results) -> str:
    run = results.waiters
    if not run:
        return "## 10. A thousand concurrent `wait()` calls\n\nNot measured in this run."
    phases = (
        ("before the waiters (baseline)", "push_baseline"),
        ("while the waiters start (each reads its task)", "push_while_starting"),
        ("while they wait", "push_while_waiting"),
        ("while they all wake up and read their tasks", "push_while_waking"),
    )
    rows = [[label, *milliseconds(run.get(key, []))] for label, key in phases]
    return (
        "## 10. A thousand concurrent `wait()` calls\n\n"
        f"{run['waiters']:,} tasks, one `wait()` each, all at once, on one client with the default pool "
        f"({run['pool']} connections); then one `update_many` ends every task. All returned "
        f"**{run['all_returned_seconds']:.2f} s** after that update was sent "
        f"(first {run['first_return_seconds']:.2f} s, median {run['median_return_seconds']:.2f} s; the update "
        f"itself took {run['end_update_seconds']:.2f} s). "
        f"Start-up ({run['start_seconds']:.1f} s) sent "
        f"{by_name(run['start_commands'])}; the end sent {by_name(run['end_commands'])} (the probe pushes' inserts "
        "included). Meanwhile the same client pushed probe tasks to another collection, one after another: does "
        "the pool stall them?\n\n" + table(["pushes made", "p50 ms", "p95 ms", "max ms", "pushes"], rows)
    )


def write_markdown(results: Results, large: dict[str, Any] | None = None) -> str:
    """The report; ``large`` is the last ``--links-large`` run (``links-large.json``), shown in section 7."""
    server = results.server
    sections = ", ".join(f"{name} {seconds:.0f}" for name, seconds in results.section_seconds.items()) or "-"
    parts = [
        "# Benchmark results\n\n"
        "Generated by `python -m bench` (`make bench`); do not edit by hand. Method and discussion: "
        "`docs/performance.md`.\n\n"
        f"- run: {results.machine.get('date')}, {results.mode} mode, {results.seconds:.0f} s\n"
        f"- machine: {results.machine.get('cpus')} CPUs, {results.machine.get('platform')}, "
        f"Python {results.machine.get('python')}\n"
        f"- server for **every table below**: {server.get('label')}, reports version {server.get('version')}"
        f"{', replica set ' + server['replica_set'] if server.get('replica_set') else ''}\n"
        f"- load average (1, 5, 15 min) at the start: {load(results.machine.get('load_start'))}; "
        f"at the end: {load(results.machine.get('load_end'))} (other work on the machine slows every rate)\n"
        f"- seconds per section: {sections}\n"
        "- figures are medians with (min-max) over repetitions",
        systems_section(results),
        commands_section(results),
        batch_section(results),
        throughput_section(results),
        latency_section(results),
        scaling_section(results),
        memory_section(results),
        links_section(results.links, large),
        cpu_section(results),
        idle_section(results) if results.idle else "## 9. Idle commands per second\n\nNot measured in this run.",
        waiters_section(results),
        push_many_section(results),
    ]
    if results.errors:
        parts.append("## Errors\n\n" + "\n".join(f"- {name}: {text}" for name, text in results.errors.items()))
    return "\n\n".join(parts) + "\n"


def write_plot(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if results.cpu else 2
    figure, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5))
    left, right = axes[0], axes[1]
    systems = list(results.throughput)
    concurrencies = results.sizes.concurrencies
    width = 0.8 / max(len(systems), 1)
    for index, system in enumerate(systems):
        medians, low, high = [], [], []
        for c in concurrencies:
            runs = results.throughput[system].get(c) or [0.0]
            spread = Spread.of(runs)
            medians.append(spread.median)
            low.append(spread.median - spread.low)
            high.append(spread.high - spread.median)
        positions = [i + index * width for i in range(len(concurrencies))]
        left.bar(positions, medians, width, yerr=[low, high], capsize=2, label=system)
    left.set_xticks(
        [i + width * (len(systems) - 1) / 2 for i in range(len(concurrencies))], [f"C = {c}" for c in concurrencies]
    )
    left.set_ylabel("tasks / second (median, min-max)")
    left.set_title("Throughput, no-op handler")
    if systems:
        left.legend(fontsize=8)

    names = [name for name, seconds in results.latency.items() if seconds]
    for index, label in enumerate(("p50", "p95", "p99")):
        values = [getattr(Latency.of(results.latency[n]), label) * 1000 for n in names]
        right.bar([i + index * 0.27 for i in range(len(names))], values, 0.27, label=label)
    right.set_xticks([i + 0.27 for i in range(len(names))], [n.replace(" (", "\n(") for n in names], fontsize=8)
    right.set_ylabel("milliseconds")
    right.set_title("Enqueue-to-start latency")
    if names:
        right.legend(fontsize=8)
    if results.cpu:
        plot_cpu(axes[2], results)
    figure.suptitle(
        f"beanie-tasks and peers on {results.server.get('label')} ({results.mode} run, {results.machine.get('date')})",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_cpu(axis: Any, results: Results) -> None:
    """Client CPU per task, beanie-tasks beside the raw loop, for each path (medians, min-max)."""
    run = results.cpu
    paths: list[tuple[str, list[float], list[float]]] = [("push", run["push"]["ours"], run["push"]["raw"])]
    paths.append(("pop + finish", run["pop_finish"]["ours"], run["pop_finish"]["raw"]))
    for concurrency, pair in sorted(run.get("worker", {}).items()):
        paths.append((f"Worker C={concurrency}", pair["ours"]["cpu_us"], pair["raw"]["cpu_us"]))
    for offset, label in enumerate(("beanie-tasks", "raw PyMongo loop")):
        spreads = [Spread.of(path[1] if offset == 0 else path[2]) for path in paths]
        axis.bar(
            [i + offset * 0.4 for i in range(len(paths))],
            [s.median for s in spreads],
            0.4,
            yerr=[[s.median - s.low for s in spreads], [s.high - s.median for s in spreads]],
            capsize=2,
            label=label,
        )
    axis.set_xticks([i + 0.2 for i in range(len(paths))], [path[0] for path in paths], fontsize=8)
    axis.set_ylabel("µs of client CPU per task (median, min-max)")
    axis.set_title("Client CPU per task")
    axis.legend(fontsize=8)


def write_report(results: Results, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / "latest.md"
    plot = out / "latest.png"
    markdown.write_text(write_markdown(results, read_large(out)))
    write_plot(results, plot)
    return markdown, plot
