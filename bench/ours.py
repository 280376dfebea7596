"""Workloads for beanie-tasks itself and for the raw-driver floor, run in the main environment."""

from __future__ import annotations

import asyncio
import importlib.util
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from beanie import init_beanie
from beanie.odm.utils.dump import get_dict
from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel, ReturnDocument

from beanie_tasks import State, Task
from beanie_tasks.batch import claim_batch, finish_batch
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.store import CLAIM_INDEX, CLAIM_SORT, MAX_BATCH
from beanie_tasks.task import utcnow
from beanie_tasks.testing import CommandCounter


class BenchJob(Task):
    """A task with nothing to do; ``sent`` is the wall-clock time it was pushed."""

    sent: float = 0.0

    class Settings:
        name = "bench_jobs"

    async def run(self) -> None:
        """Nothing: the benchmarks measure the queue, not the work."""


@dataclass
class OpCount:
    """Commands one operation sent, summed over ``repeat`` tasks."""

    names: Counter[str] = field(default_factory=Counter)
    repeat: int = 0

    @property
    def per_task(self) -> float:
        return sum(self.names.values()) / self.repeat if self.repeat else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.per_task, "by_name": {k: v / max(self.repeat, 1) for k, v in self.names.items()}}


@asynccontextmanager
async def bench_database(uri: str, counter: CommandCounter | None = None, **options: Any) -> AsyncIterator[Any]:
    """A fresh, uniquely named database, dropped afterwards."""
    listeners = [counter] if counter is not None else []
    client = client_for(uri, event_listeners=listeners, **options)
    name = f"bench_{uuid.uuid4().hex[:10]}"
    try:
        yield client[name]
    finally:
        await client.drop_database(name)
        await close_client(client)


async def counted(counter: CommandCounter, op: OpCount, action: Awaitable[Any]) -> Any:
    counter.reset()
    value = await action
    op.names.update(counter.commands)
    op.repeat += 1
    return value


# ------------------------------------------------------------ commands per task


async def commands_independent(uri: str, repeat: int) -> dict[str, Any]:
    """push, claim, finish and fail of a task with no links."""
    counter = CommandCounter()
    ops = {name: OpCount() for name in ("push", "claim", "finish", "fail")}
    async with bench_database(uri, counter) as db:
        await init_beanie(database=db, document_models=[BenchJob])
        for _ in range(repeat):
            await counted(counter, ops["push"], BenchJob().push())
            task = await counted(counter, ops["claim"], BenchJob.pop())
            await counted(counter, ops["finish"], task.finish())
            await BenchJob().push()
            failing = await BenchJob.pop()
            if failing is None:
                raise RuntimeError("the task to fail was not claimable")
            await counted(counter, ops["fail"], failing.fail("bench"))
    return {name: op.as_dict() for name, op in ops.items()}


def dependencies_available() -> bool:
    return importlib.util.find_spec("beanie_tasks.dependencies") is not None


async def commands_with_dependencies(uri: str, links: int) -> dict[str, Any]:
    """The same operations for a task with ``links`` ALL_OF dependencies, and the cost on the dependencies."""
    from beanie import Link

    from beanie_tasks import DependencyType, depends_on

    class BenchDep(Task):
        class Settings:
            name = "bench_deps"

    class BenchNeeds(Task):
        parts: list[Link[BenchDep]] = depends_on(DependencyType.ALL_OF, default_factory=list)

        class Settings:
            name = "bench_needs"

    counter = CommandCounter()
    ops = {name: OpCount() for name in ("push", "claim", "finish", "fail", "dependency finish")}
    async with bench_database(uri, counter) as db:
        await init_beanie(database=db, document_models=[BenchDep, BenchNeeds])
        for outcome in ("finish", "fail"):
            deps = [await BenchDep().push() for _ in range(links)]
            await counted(counter, ops["push"], BenchNeeds(parts=deps).push())  # type: ignore[arg-type,unused-ignore]
            for _ in range(links):
                dep = await BenchDep.pop()
                if dep is None:
                    raise RuntimeError("a dependency was not claimable")
                await counted(counter, ops["dependency finish"], dep.finish())
            task = await counted(counter, ops["claim"], BenchNeeds.pop())
            if task is None:
                raise RuntimeError("the dependent did not become claimable after its dependencies finished")
            await counted(counter, ops[outcome], task.finish() if outcome == "finish" else task.fail("bench"))
    return {name: op.as_dict() for name, op in ops.items()}


async def commands_batch(uri: str, k: int, rounds: int) -> dict[str, Any]:
    """Commands per task of ``claim_batch`` + ``finish_batch`` with ``k`` tasks ready."""
    counter = CommandCounter()
    claim, ack = OpCount(), OpCount()
    async with bench_database(uri, counter) as db:
        await init_beanie(database=db, document_models=[BenchJob])
        for _ in range(rounds):
            for _ in range(k):
                await BenchJob().push()
            batch = await counted(counter, claim, claim_batch(BenchJob, k))
            if len(batch) != k:
                raise RuntimeError(f"claim_batch returned {len(batch)} of {k} tasks")
            await counted(counter, ack, finish_batch(batch))
    tasks = rounds * k
    return {
        "claim": sum(claim.names.values()) / tasks,
        "ack": sum(ack.names.values()) / tasks,
        "claim_by_name": dict(claim.names),
        "ack_by_name": dict(ack.names),
    }


# ------------------------------------------------------------------- throughput


async def drain(consumer: Callable[[], Awaitable[int]], concurrency: int) -> tuple[int, float]:
    started = time.perf_counter()
    done = await asyncio.gather(*(consumer() for _ in range(concurrency)))
    return sum(done), time.perf_counter() - started


async def throughput_ours(uri: str, tasks: int, concurrency: int) -> float:
    """Tasks per second: ``concurrency`` consumers drain ``tasks`` with pop() + finish()."""
    async with bench_database(uri) as db:
        await init_beanie(database=db, document_models=[BenchJob])
        for _ in range(tasks):
            await BenchJob().push()

        async def consumer() -> int:
            done = 0
            while (task := await BenchJob.pop()) is not None:
                await task.finish()
                done += 1
            return done

        done, seconds = await drain(consumer, concurrency)
    return done / seconds


async def throughput_batch(uri: str, tasks: int, concurrency: int, k: int) -> float:
    """Tasks per second with claim_batch(k) + finish_batch."""
    async with bench_database(uri) as db:
        await init_beanie(database=db, document_models=[BenchJob])
        for _ in range(tasks):
            await BenchJob().push()

        async def consumer() -> int:
            done = 0
            while batch := await claim_batch(BenchJob, k):
                await finish_batch(batch)
                done += len(batch)
            return done

        done, seconds = await drain(consumer, concurrency)
    return done / seconds


def stored_document() -> dict[str, Any]:
    """What beanie-tasks stores for a pushed ``BenchJob`` (every field, nulls included), without ``_id``."""
    fields = BenchJob.model_construct(run_at=utcnow(), max_attempts=1).model_dump(mode="python")
    fields["state"] = State.CREATED.value
    return {name: value for name, value in fields.items() if name not in ("id", "revision_id")}


async def throughput_floor(uri: str, tasks: int, concurrency: int, *, like_beanie_tasks: bool = False) -> float:
    """The raw-driver floor: a find_one_and_update + update_one loop with no library in between.

    By default: bare three-field documents and one index (the claim's). With
    ``like_beanie_tasks`` the loop runs on the collection beanie-tasks sets up (all its
    indexes), over the documents it stores, sending the very updates ``pop()`` and
    ``finish()`` send: the gap between this row and beanie-tasks is the library's own
    client-side cost, and the gap to the bare floor is what the server charges for the
    richer documents, writes and indexes.
    """
    client = client_for(uri)
    name = f"bench_floor_{uuid.uuid4().hex[:8]}"
    try:
        if like_beanie_tasks:
            await init_beanie(database=client[name], document_models=[BenchJob])
            collection = BenchJob.collection()
        else:
            collection = client[name]["floor"]
            await collection.create_indexes(
                [
                    IndexModel(
                        [("state", ASCENDING), ("priority", DESCENDING), ("run_at", ASCENDING), ("_id", ASCENDING)]
                    )
                ]
            )
        for _ in range(tasks):
            bare = {"state": "CREATED", "priority": 2, "run_at": utcnow()}
            await collection.insert_one(stored_document() if like_beanie_tasks else bare)

        def claim_update(now: datetime) -> dict[str, Any]:
            if not like_beanie_tasks:
                return {"$set": {"state": "RUNNING", "lease_token": uuid.uuid4().hex}}
            lease = {"consumer_id": "floor", "lease_token": uuid.uuid4().hex, "started_at": now}
            lease["lease_expires_at"] = now + BenchJob.task_options.lease
            return {"$set": {"state": "RUNNING", **lease}, "$inc": {"attempts": 1}}

        def finish_update(now: datetime) -> dict[str, Any]:
            if not like_beanie_tasks:
                return {"$set": {"state": "FINISHED"}}
            fields = {"finished_at": now, "expires_at": None, "lease_expires_at": None, "result": None}
            return {"$set": {"state": "FINISHED", **fields}, "$unset": {"dedupe_slot": ""}}

        async def consumer() -> int:
            done = 0
            while True:
                now = datetime.now(timezone.utc)
                doc = await collection.find_one_and_update(
                    {"state": "CREATED", "run_at": {"$lte": now}},
                    claim_update(now),
                    sort=CLAIM_SORT,
                    return_document=ReturnDocument.AFTER,
                )
                if doc is None:
                    return done
                await collection.update_one(
                    {"_id": doc["_id"], "state": "RUNNING", "lease_token": doc["lease_token"]}, finish_update(now)
                )
                done += 1

        done, seconds = await drain(consumer, concurrency)
    finally:
        await client.drop_database(name)
        await close_client(client)
    return done / seconds


async def commands_floor(uri: str, repeat: int) -> dict[str, Any]:
    counter = CommandCounter()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True, event_listeners=[counter])
    name = f"bench_floor_{uuid.uuid4().hex[:8]}"
    collection = client[name]["floor"]
    ops = {n: OpCount() for n in ("push", "claim", "finish", "fail")}
    try:
        for _ in range(repeat):
            for outcome in ("finish", "fail"):
                op = ops["push"] if outcome == "finish" else OpCount()
                await counted(
                    counter, op, collection.insert_one({"state": "CREATED", "priority": 2, "run_at": utcnow()})
                )
                claim = ops["claim"] if outcome == "finish" else OpCount()
                doc = await counted(
                    counter,
                    claim,
                    collection.find_one_and_update(
                        {"state": "CREATED"},
                        {"$set": {"state": "RUNNING"}},
                        sort=CLAIM_SORT,
                        return_document=ReturnDocument.AFTER,
                    ),
                )
                final = "FINISHED" if outcome == "finish" else "FAILED"
                await counted(
                    counter, ops[outcome], collection.update_one({"_id": doc["_id"]}, {"$set": {"state": final}})
                )
    finally:
        await client.drop_database(name)
        await client.close()
    return {n: op.as_dict() for n, op in ops.items()}


# ---------------------------------------------------------------------- latency


async def latency_ours(uri: str, samples: int, *, change_stream: bool, seed: int = 1) -> list[float]:
    """Enqueue-to-start seconds seen by an idle ``queue()`` consumer."""
    rng = random.Random(seed)
    delays: list[float] = []
    claimed = asyncio.Event()
    stop = asyncio.Event()
    async with bench_database(uri) as db:
        await init_beanie(database=db, document_models=[BenchJob])

        async def consume() -> None:
            async for task in BenchJob.queue(stop=stop, use_change_stream=change_stream):
                delays.append(time.time() - task.sent)
                await task.finish()
                claimed.set()

        consumer = asyncio.create_task(consume())
        try:
            await asyncio.sleep(0.5)
            for _ in range(samples):
                claimed.clear()
                await asyncio.sleep(rng.uniform(0.05, 0.6))
                await BenchJob(sent=time.time()).push()
                await asyncio.wait_for(claimed.wait(), 30)
        finally:
            stop.set()
            await asyncio.wait_for(consumer, 30)
    return delays


# ---------------------------------------------------------------------- scaling


def plan_summary(explain: dict[str, Any]) -> dict[str, Any]:
    """The winning plan as a chain of stages, and what execution examined."""
    stages: list[str] = []
    stage: dict[str, Any] | None = explain.get("queryPlanner", {}).get("winningPlan")
    while stage:
        label = stage.get("stage", "?")
        if stage.get("indexName"):
            label += f"({stage['indexName']})"
        stages.append(label)
        stage = stage.get("inputStage")
    stats = explain.get("executionStats", {})
    return {
        "plan": " <- ".join(stages),
        "sort_stage": any(s.startswith("SORT") for s in stages),
        "keys_examined": stats.get("totalKeysExamined"),
        "docs_examined": stats.get("totalDocsExamined"),
    }


def stored_form(task: Task) -> dict[str, Any]:
    """The document ``push()`` would store, for seeding big queues with one ``insert_many`` per chunk."""
    document: dict[str, Any] = get_dict(task, to_db=True, keep_nulls=True)
    return document | {"_id": ObjectId()}


async def scaling(uri: str, queued: int, claims: int) -> dict[str, Any]:
    """Commands and milliseconds per claim with ``queued`` tasks waiting, and the claim's plan."""
    counter = CommandCounter()
    async with bench_database(uri, counter) as db:
        await init_beanie(database=db, document_models=[BenchJob])
        now = utcnow()
        for start in range(0, queued, 5000):
            chunk = [stored_form(BenchJob(run_at=now, max_attempts=1)) for _ in range(min(5000, queued - start))]
            await BenchJob.collection().insert_many(chunk)
        claim_filter = BenchJob.claim_filter(utcnow())
        command = {
            "findAndModify": BenchJob.get_collection_name(),
            "query": claim_filter,
            "sort": dict(CLAIM_SORT),
            "update": {"$set": {"state": "RUNNING"}},
        }
        chosen = plan_summary(await db.command("explain", command, verbosity="executionStats"))
        hinted = plan_summary(await db.command("explain", command | {"hint": CLAIM_INDEX}, verbosity="executionStats"))
        op = OpCount()
        millis: list[float] = []
        sent_hints: set[str] = set()
        for _ in range(claims):
            started = time.perf_counter()
            task = await counted(counter, op, BenchJob.pop())
            millis.append((time.perf_counter() - started) * 1000)
            if task is None:
                raise RuntimeError("queue drained during the scaling run")
            sent_hints.add(str(counter.last.get("findAndModify", {}).get("hint")))
    return {
        "queued": queued,
        "commands": op.per_task,
        "millis": millis,
        "planner": chosen,
        "hinted": hinted,
        # What pop() itself put in its findAndModify: the plan it runs is the hinted one.
        "claim_hint": ", ".join(sorted(sent_hints)),
    }


async def server_description(uri: str) -> dict[str, Any]:
    client = client_for(uri, serverSelectionTimeoutMS=10_000)
    try:
        info = await client.admin.command("buildInfo")
        hello = await client.admin.command("hello")
    finally:
        await close_client(client)
    return {"version": info.get("version", "?"), "replica_set": hello.get("setName")}


async def links_fan(uri: str, fan_out: int, fan_in: int) -> dict[str, Any]:
    """Cost of one task with ``fan_out`` dependents, and of one dependent of ``fan_in`` tasks.

    Fan-out: the dependents pushed with one ``push_many`` (then removed), pushed again one
    ``push()`` at a time, then the one task finished, which releases them. Fan-in: the N
    tasks pushed (not counted), one dependent of them all pushed, then the N claimed in
    batches (not counted) and finished one by one. Commands and seconds, in total and per
    link, so a reader sees whether each grows linearly. A fan-in over the library's limit
    is reported as refused, with the error it raised.
    """
    from beanie import Link

    from beanie_tasks import DependencyType, PushError, depends_on
    from beanie_tasks.dependencies import MAX_LINKS_PER_TASK

    class FanRoot(Task):
        class Settings:
            name = "bench_fan_roots"

    class FanChild(Task):
        parent: Link[FanRoot] = depends_on(DependencyType.DIRECT)

        class Settings:
            name = "bench_fan_children"

    class FanJoin(Task):
        parts: list[Link[FanRoot]] = depends_on(DependencyType.ALL_OF, default_factory=list)

        class Settings:
            name = "bench_fan_joins"

    counter = CommandCounter()
    out: dict[str, Any] = {"fan_out": fan_out, "fan_in": fan_in, "max_links_per_task": MAX_LINKS_PER_TASK}
    parked = {"run_at": {"$gt": datetime(9000, 1, 1, tzinfo=timezone.utc)}}
    async with bench_database(uri, counter) as db:
        await init_beanie(database=db, document_models=[FanRoot, FanChild, FanJoin])
        # push_many: built before the clock starts, as a caller's tasks are.
        bulk_root = await FanRoot().push()
        children = [FanChild(parent=bulk_root) for _ in range(fan_out)]  # type: ignore[arg-type,unused-ignore]
        counter.reset()
        started = time.perf_counter()
        outcomes = await FanChild.push_many(children)
        out["fan_out_push_many_seconds"] = time.perf_counter() - started
        out["fan_out_push_many_commands_per_link"] = counter.total / fan_out
        if not all(outcome.pushed for outcome in outcomes) or await FanChild.find(parked).count() != fan_out:
            raise RuntimeError("push_many did not park every dependent")
        # The one-by-one row and the finish start from an empty collection, and this root is out of the claims' way.
        await FanChild.collection().delete_many({})
        await bulk_root.cancel()
        root = await FanRoot().push()
        counter.reset()
        started = time.perf_counter()
        for _ in range(fan_out):
            await FanChild(parent=root).push()  # type: ignore[arg-type,unused-ignore]
        out["fan_out_push_seconds"] = time.perf_counter() - started
        out["fan_out_push_commands_per_link"] = counter.total / fan_out
        claimed = await FanRoot.pop()
        if claimed is None or claimed.id != root.id:
            raise RuntimeError("the root was not claimable")
        counter.reset()
        started = time.perf_counter()
        await claimed.finish()
        out["fan_out_finish_seconds"] = time.perf_counter() - started
        out["fan_out_finish_commands"] = dict(counter.by_name())
        out["fan_out_finish_commands_per_link"] = counter.total / fan_out
        released = await FanChild.find({"run_at": {"$lt": datetime(9000, 1, 1, tzinfo=timezone.utc)}}).count()
        if released != fan_out:
            raise RuntimeError(f"{released} of {fan_out} dependents were released")
        parts = [FanRoot() for _ in range(fan_in)]
        if not all(outcome.pushed for outcome in await FanRoot.push_many(parts)):
            raise RuntimeError("the fan-in's tasks were not all pushed")
        counter.reset()
        started = time.perf_counter()
        try:
            await FanJoin(parts=parts).push()  # type: ignore[arg-type,unused-ignore]
        except PushError as exc:
            out["fan_in_refused"] = str(exc)
            return out
        out["fan_in_push_seconds"] = time.perf_counter() - started
        out["fan_in_push_commands"] = counter.total
        # Claimed first, in batches, and not counted: one pop() per part would time the bundled server's
        # scans of the part collection, not the finish that tells the dependent.
        claimed_parts: list[FanRoot] = []
        while len(claimed_parts) < fan_in:
            batch = await claim_batch(FanRoot, min(MAX_BATCH, fan_in - len(claimed_parts)))
            if not batch:
                raise RuntimeError(f"only {len(claimed_parts)} of {fan_in} parts were claimable")
            claimed_parts += batch
        counter.reset()
        started = time.perf_counter()
        for part in claimed_parts:
            await part.finish()
        out["fan_in_finish_seconds"] = time.perf_counter() - started
        out["fan_in_finish_seconds_per_link"] = out["fan_in_finish_seconds"] / fan_in
        out["fan_in_finish_commands_per_link"] = counter.total / fan_in
        if await FanJoin.pop() is None:
            raise RuntimeError("the join did not become claimable")
    return out


async def push_many_cost(uri: str, tasks: int, repetitions: int) -> dict[str, Any]:
    """Commands, wall and client CPU per task of ``push_many`` over ``tasks`` independent tasks.

    Against a raw ``insert_many`` of the very documents ``push_many`` stored (fresh ids,
    into a collection of their own with the same indexes), measured in the same run: the gap in client CPU is
    what validation, the stored form and the outcome bookkeeping cost. The tasks are
    built before the clock starts, as a raw caller's documents are. CPU is this
    process's own (``time.process_time``); the server runs in another process.
    """
    counter = CommandCounter()
    runs: dict[str, list[float]] = {"ours_cpu": [], "raw_cpu": [], "ours_wall": [], "raw_wall": []}
    commands: Counter[str] = Counter()
    async with bench_database(uri, counter) as db:
        await init_beanie(database=db, document_models=[BenchJob])
        raw = db["bench_raw_insert_many"]
        await raw.create_indexes(BenchJob.task_store().index_models())  # the server's share of the work alike
        for _ in range(repetitions):
            batch = [BenchJob(sent=float(i)) for i in range(tasks)]
            counter.reset()
            wall, cpu = time.perf_counter(), time.process_time()
            outcomes = await BenchJob.push_many(batch)
            runs["ours_cpu"].append((time.process_time() - cpu) / tasks)
            runs["ours_wall"].append((time.perf_counter() - wall) / tasks)
            commands.update(counter.commands)
            if not all(outcome.pushed for outcome in outcomes):
                raise RuntimeError("push_many did not push every task")
            stored = [doc async for doc in BenchJob.collection().find({})]
            documents = [doc | {"_id": ObjectId()} for doc in stored]
            wall, cpu = time.perf_counter(), time.process_time()
            await raw.insert_many(documents, ordered=False)
            runs["raw_cpu"].append((time.process_time() - cpu) / tasks)
            runs["raw_wall"].append((time.perf_counter() - wall) / tasks)
            await BenchJob.collection().delete_many({})
            await raw.delete_many({})
    return {
        "tasks": tasks,
        "commands_per_task": sum(commands.values()) / (tasks * repetitions),
        "commands_by_name": {name: count / repetitions for name, count in commands.items()},
        **runs,
    }
