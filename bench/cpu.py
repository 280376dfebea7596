"""Client CPU per task: beanie-tasks against a raw PyMongo loop sending the same documents and commands.

What a worker process can do on a real MongoDB is capped by its own CPU per task (a
claim takes a fraction of a millisecond there), and that cost does not depend on the
server. So this section counts the CPU time of this process only
(``time.process_time()``: every thread of the client, none of the server, which is a
separate process) over a loop of tasks, divided by the tasks:

- ``push()`` against ``insert_one`` of the very document ``push()`` stored (read back
  once, then copied with a fresh ``_id`` per insert);
- ``pop()`` + ``finish()`` against the same claim ``findAndModify`` (filter, sort, hint,
  ``$set`` and ``$inc`` fields of ``beanie_tasks.store``'s claim) and the same finish;
- a ``Worker`` draining a backlog at concurrency C against C coroutines running that raw
  claim + finish loop, with the commands each sent, by name.

``raw_matches_library`` checks, before anything is timed, that the raw loop's commands
have the shape of the commands beanie-tasks actually sent, so the floor follows the
library when its claim or finish changes.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

from beanie import init_beanie
from bson import ObjectId
from pymongo import ReturnDocument
from pymongo.monitoring import CommandStartedEvent

from beanie_tasks import Task, Worker
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.store import CLAIM_INDEX, CLAIM_SORT, ENDED_PROJECTION
from beanie_tasks.task import utcnow
from beanie_tasks.testing import BACKGROUND_COMMANDS, CommandCounter, eventually
from bench.ours import bench_database, stored_form

# Keys the driver adds to every command: sessions, cluster time, the database name.
DRIVER_KEYS = frozenset({"lsid", "$db", "$clusterTime", "txnNumber", "$readPreference", "writeConcern", "readConcern"})
# How long a worker must have sent nothing but change-stream getMores before it counts as settled (idle).
SETTLED_AFTER = 0.3
# The longest any one drain may take before the run is declared stuck.
DRAIN_TIMEOUT = 300.0


class Countdown:
    """Set once ``run()`` was called ``tasks`` times."""

    def __init__(self, tasks: int) -> None:
        self.left = tasks
        self.done = asyncio.Event()

    def tick(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.done.set()


class CpuJob(Task):
    """A no-op task whose ``run()`` counts down, so the harness knows when a drain is over without polling."""

    countdown: ClassVar[Countdown | None] = None

    class Settings:
        name = "bench_cpu_jobs"

    async def run(self) -> None:
        if CpuJob.countdown is not None:
            CpuJob.countdown.tick()


@dataclass
class Drain:
    """One drain of a backlog: client CPU per task and the commands sent per task, by name."""

    cpu_us: float
    commands: Counter[str] = field(default_factory=Counter)
    tasks: int = 0

    def per_task(self) -> dict[str, float]:
        return {name: count / self.tasks for name, count in sorted(self.commands.items())}


def cpu_per_task_us(started: float, tasks: int) -> float:
    return (time.process_time() - started) / tasks * 1e6


def fresh_start() -> float:
    """Collect garbage first (so one run does not pay for the last one's), then read the process's CPU clock."""
    gc.collect()
    return time.process_time()


# --------------------------------------------------------------- the raw loop


def raw_claim(now: datetime, consumer_id: str, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The claim's filter and update as ``beanie_tasks.store.Store.claim`` sends them, written out by hand."""
    selector = {"state": "CREATED", "state.0": {"$exists": False}, "run_at": {"$lte": now}}
    update = {
        "$set": {
            "state": "RUNNING",
            "consumer_id": consumer_id,
            "lease_token": token,
            "lease_expires_at": now + CpuJob.task_options.lease,
            "started_at": now,
        },
        "$inc": {"attempts": 1},
    }
    return selector, update


def raw_finish(task_id: Any, token: str, now: datetime) -> tuple[dict[str, Any], dict[str, Any]]:
    """The finish's guard and update as ``Task.finish`` sends them (result None)."""
    ttl = CpuJob.task_options.ttl
    fields = {
        "state": "FINISHED",
        "finished_at": now,
        "expires_at": now + timedelta(seconds=ttl) if ttl is not None else None,
        "lease_expires_at": None,
        "result": None,
    }
    return {"_id": task_id, "state": "RUNNING", "lease_token": token}, {"$set": fields, "$unset": {"dedupe_slot": ""}}


async def raw_claim_and_finish(collection: Any, consumer_id: str) -> bool:
    """One raw claim + finish; False when nothing was ready."""
    now = datetime.now(timezone.utc)
    token = uuid.uuid4().hex
    selector, update = raw_claim(now, consumer_id, token)
    document = await collection.find_one_and_update(
        selector, update, sort=CLAIM_SORT, hint=CLAIM_INDEX, return_document=ReturnDocument.AFTER
    )
    if document is None:
        return False
    guard, finish = raw_finish(document["_id"], token, datetime.now(timezone.utc))
    await collection.find_one_and_update(
        guard, finish, projection=ENDED_PROJECTION, return_document=ReturnDocument.AFTER
    )
    return True


def shape(value: Any) -> Any:
    """A command with its values replaced by their types: what must match between the raw loop and the library."""
    if isinstance(value, Mapping):
        return {key: shape(inner) for key, inner in sorted(value.items()) if key not in DRIVER_KEYS}
    if isinstance(value, (list, tuple)):
        return [shape(inner) for inner in value]
    # The BSON type, not a subclass the model uses (PydanticObjectId is stored as an ObjectId).
    stored = next(k for k in type(value).__mro__ if k.__module__.split(".")[0] in ("bson", "builtins", "datetime"))
    return stored.__name__


def differences(ours: Any, raw: Any, where: str = "") -> list[str]:
    if isinstance(ours, dict) and isinstance(raw, dict):
        found = []
        for key in sorted(set(ours) | set(raw)):
            if key not in raw:
                found.append(f"{where}{key}: only beanie-tasks sends it")
            elif key not in ours:
                found.append(f"{where}{key}: only the raw loop sends it")
            else:
                found += differences(ours[key], raw[key], f"{where}{key}.")
        return found
    return [] if ours == raw else [f"{where.rstrip('.')}: {ours} vs {raw}"]


async def raw_matches_library(uri: str) -> list[str]:
    """Send one claim + finish each way and compare the commands' shapes; returns the differences (none: equal)."""
    counter = Recording(keep_commands=True)
    sent: dict[str, list[dict[str, Any]]] = {}
    async with bench_database(uri, counter) as db:
        await init_beanie(database=db, document_models=[CpuJob])
        await CpuJob.collection().insert_many([stored_form(CpuJob(run_at=utcnow(), max_attempts=1)) for _ in range(2)])
        for side in ("beanie-tasks", "raw"):
            counter.reset()
            if side == "raw":
                await raw_claim_and_finish(db[CpuJob.get_collection_name()], "raw")
            else:
                task = await CpuJob.pop()
                if task is None:
                    raise RuntimeError("nothing to claim for the command comparison")
                await task.finish()
            sent[side] = [dict(command) for command in counter.sent]
    found: list[str] = []
    ours, raw = sent["beanie-tasks"], sent["raw"]
    if [next(iter(c)) for c in ours] != [next(iter(c)) for c in raw]:
        return [f"commands: {[next(iter(c)) for c in ours]} vs {[next(iter(c)) for c in raw]}"]
    for index, (mine, theirs) in enumerate(zip(ours, raw, strict=True)):
        found += differences(shape(mine), shape(theirs), f"{next(iter(mine))}#{index + 1}.")
    return found


# ------------------------------------------------- push, pop + finish

# Tasks per chunk: within a round the two sides alternate chunk by chunk, in one database,
# so a burst of load on the machine (seconds long) lands on both sides alike.
CHUNK = 10

Action = Callable[[], Awaitable[Any]]


async def interleaved(tasks: int, ours: Action, raw: Action) -> tuple[float, float]:
    """``tasks`` of each side in alternating chunks (which goes first alternates too); µs of CPU per task each."""
    spent = await interleaved_sides(tasks, {"ours": ours, "raw": raw})
    return spent["ours"], spent["raw"]


async def interleaved_sides(tasks: int, sides: dict[str, Action]) -> dict[str, float]:
    """``tasks`` of each side in chunks taken in turn (the order reverses chunk by chunk); µs of CPU per task each."""
    spent = dict.fromkeys(sides, 0.0)
    order = list(sides.items())
    fresh_start()
    for chunk, first in enumerate(range(0, tasks, CHUNK)):
        size = min(CHUNK, tasks - first)
        for side, action in order if chunk % 2 == 0 else order[::-1]:
            started = time.process_time()
            for _ in range(size):
                await action()
            spent[side] += time.process_time() - started
    return {side: seconds / tasks * 1e6 for side, seconds in spent.items()}


async def push_round(uri: str, tasks: int) -> dict[str, float]:
    """``push()`` against ``insert_one`` of a copy of the very document ``push()`` stored.

    A third side, ``built``, builds the model as a caller does (``CpuJob()``) and then sends
    the raw insert: what the typed API costs before ``push()`` does anything, which the raw
    loop, inserting a ready dict, never pays.
    """
    async with bench_database(uri) as db:
        await init_beanie(database=db, document_models=[CpuJob])
        await CpuJob().push()  # the first push opens the connection
        collection = db[CpuJob.get_collection_name()]
        stored = await collection.find_one()

        async def ours() -> None:
            await CpuJob().push()

        async def raw() -> None:
            await collection.insert_one(stored | {"_id": ObjectId()})

        async def built() -> None:
            CpuJob()
            await collection.insert_one(stored | {"_id": ObjectId()})

        return await interleaved_sides(tasks, {"ours": ours, "raw": raw, "built": built})


async def backlog(tasks: int, *, run_at: datetime | None = None) -> None:
    """``tasks`` ready tasks (or held until ``run_at``), stored as ``push()`` stores them, in one insert_many."""
    due = run_at or utcnow()
    await CpuJob.collection().insert_many([stored_form(CpuJob(run_at=due, max_attempts=1)) for _ in range(tasks)])


async def pop_finish_round(uri: str, tasks: int) -> tuple[float, float]:
    """``pop()`` + ``finish()`` against the raw claim + finish, both drawing on one backlog."""
    async with bench_database(uri) as db:
        await init_beanie(database=db, document_models=[CpuJob])
        await backlog(2 * tasks + 2)
        collection = db[CpuJob.get_collection_name()]
        first = await CpuJob.pop()  # warm: the connection, the first model validation
        assert first is not None
        await first.finish()
        await raw_claim_and_finish(collection, "raw")

        async def ours() -> None:
            task = await CpuJob.pop()
            if task is None:
                raise RuntimeError("the backlog ran out")
            await task.finish()

        async def raw() -> None:
            if not await raw_claim_and_finish(collection, "raw"):
                raise RuntimeError("the backlog ran out")

        return await interleaved(tasks, ours, raw)


# ------------------------------------------------------------------ drains


class Recording(CommandCounter):
    """A command counter that remembers when the last command other than a getMore started,
    and, with ``keep_commands``, every command in order (``CommandCounter`` keeps the last of each name)."""

    def __init__(self, *, keep_commands: bool = False) -> None:
        super().__init__()
        self.keep_commands = keep_commands
        self.sent: list[Mapping[str, Any]] = []
        self.last_busy = time.monotonic()

    def started(self, event: CommandStartedEvent) -> None:
        super().started(event)
        if event.command_name != "getMore":
            self.last_busy = time.monotonic()
        if self.keep_commands and event.command_name not in BACKGROUND_COMMANDS:
            self.sent.append(event.command)

    def reset(self) -> None:
        super().reset()
        self.sent.clear()


async def settled(counter: Recording, timeout: float = 60.0) -> None:
    """Wait until the worker has sent nothing but change-stream getMores for ``SETTLED_AFTER`` seconds."""
    deadline = time.monotonic() + timeout
    await asyncio.sleep(SETTLED_AFTER)
    while time.monotonic() - counter.last_busy < SETTLED_AFTER:
        if time.monotonic() > deadline:
            raise RuntimeError("the worker never went idle")
        await asyncio.sleep(0.05)


HELD = timedelta(hours=1)


async def release_backlog(uri: str, database: str) -> None:
    """Make the held backlog due at once, from a client of its own (so the counted client sees none of it)."""
    client = client_for(uri)
    try:
        await client[database][CpuJob.get_collection_name()].update_many({}, {"$set": {"run_at": utcnow()}})
    finally:
        await close_client(client)


async def drain_worker(uri: str, tasks: int, concurrency: int) -> Drain:
    """A Worker, started and idle, drains a backlog released all at once; the drain alone is counted."""
    counter = Recording()
    async with bench_database(uri, counter) as db:
        await init_beanie(database=db, document_models=[CpuJob])
        await backlog(tasks, run_at=utcnow() + HELD)
        countdown = CpuJob.countdown = Countdown(tasks)
        worker = Worker([CpuJob], concurrency=concurrency, grace_period=5.0, schedules=False)
        stop = asyncio.Event()
        job = asyncio.create_task(worker.run(stop))
        try:
            await settled(counter)
            counter.reset()
            started = fresh_start()
            await release_backlog(uri, db.name)
            await asyncio.wait_for(countdown.done.wait(), DRAIN_TIMEOUT)

            async def all_finished() -> bool:
                return worker.stats["finished"] >= tasks

            await eventually(all_finished, timeout=60, interval=0.001)  # the last finishes: a few milliseconds
            drain = Drain(cpu_per_task_us(started, tasks), counter.by_name(), tasks)
        finally:
            CpuJob.countdown = None
            stop.set()
            await asyncio.wait_for(job, 60)
    return drain


async def drain_raw(uri: str, tasks: int, concurrency: int) -> Drain:
    """C coroutines of the raw claim + finish loop drain the same backlog, released the same way."""
    counter = Recording()
    async with bench_database(uri, counter) as db:
        await init_beanie(database=db, document_models=[CpuJob])
        await backlog(tasks, run_at=utcnow() + HELD)
        collection = db[CpuJob.get_collection_name()]
        done = 0

        async def consumer() -> None:
            nonlocal done
            while await raw_claim_and_finish(collection, "raw"):
                done += 1

        await collection.find_one({})  # the connection, as the worker's start-up opens it
        counter.reset()
        started = fresh_start()
        await release_backlog(uri, db.name)
        await asyncio.wait_for(asyncio.gather(*(consumer() for _ in range(concurrency))), DRAIN_TIMEOUT)
        if done != tasks:
            raise RuntimeError(f"the raw loop drained {done} of {tasks} tasks")
        return Drain(cpu_per_task_us(started, tasks), counter.by_name(), tasks)


# ------------------------------------------------------------------ rounds


async def alternate(rounds: int, ours: Action, raw: Action) -> tuple[list[Any], list[Any]]:
    """``rounds`` of each, alternating which goes first, so a noisy moment or a warm cache favours neither."""
    mine: list[Any] = []
    theirs: list[Any] = []
    for index in range(rounds):
        if index % 2 == 0:
            mine.append(await ours())
            theirs.append(await raw())
        else:
            theirs.append(await raw())
            mine.append(await ours())
    return mine, theirs


def drains_as_dict(drains: list[Drain]) -> dict[str, Any]:
    commands: Counter[str] = Counter()
    tasks = 0
    for drain in drains:
        commands.update(drain.commands)
        tasks += drain.tasks
    return {
        "cpu_us": [drain.cpu_us for drain in drains],
        "commands_per_task": {name: count / tasks for name, count in sorted(commands.items())} if tasks else {},
    }


async def measure_cpu(
    uri: str,
    *,
    rounds: int,
    tasks: int,
    worker_tasks: int,
    path_rounds: int,
    concurrencies: tuple[int, ...],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Every CPU-per-task comparison; lists hold one figure per round (µs of client CPU per task)."""
    out: dict[str, Any] = {"rounds": rounds, "path_rounds": path_rounds, "tasks": tasks, "worker_tasks": worker_tasks}
    out["mirror_differences"] = await raw_matches_library(uri)
    pushes = [await push_round(uri, tasks) for _ in range(path_rounds)]
    out["push"] = {side: [push[side] for push in pushes] for side in ("ours", "raw", "built")}
    progress("cpu: push done")
    pairs = [await pop_finish_round(uri, tasks) for _ in range(path_rounds)]
    out["pop_finish"] = {"ours": [mine for mine, _ in pairs], "raw": [theirs for _, theirs in pairs]}
    progress("cpu: pop + finish done")
    out["worker"] = {}
    for concurrency in concurrencies:
        workers, raws = await alternate(
            rounds,
            lambda c=concurrency: drain_worker(uri, worker_tasks, c),  # type: ignore[misc]
            lambda c=concurrency: drain_raw(uri, worker_tasks, c),  # type: ignore[misc]
        )
        out["worker"][concurrency] = {"ours": drains_as_dict(workers), "raw": drains_as_dict(raws)}
        progress(f"cpu: worker at concurrency {concurrency} done")
    return out
