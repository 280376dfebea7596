"""The benchmark workloads for the peer queues, run inside their own environment.

This file is run as a script by ``bench/peers.py`` with the bench-peers virtualenv's
Python (Beanie 1.x + Motor, beanie-batteries-queue, mongo-taskqueue). It imports
nothing from beanie_tasks or the bench package and prints one JSON object.

    python bench/peer_workloads.py SYSTEM WORKLOAD URI [--tasks N] [--concurrency C] [--samples S]

SYSTEM is ``bbq`` (beanie-batteries-queue) or ``mongotq`` (mongo-taskqueue); WORKLOAD is
``info``, ``commands``, ``throughput``, ``latency`` or ``cpu`` (client CPU per task of
push and of claim + finish, in µs, ``--rounds`` rounds of ``--tasks`` tasks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata
import inspect
import json
import random
import time
import uuid
from collections import Counter
from typing import Any

from pymongo import monitoring

BACKGROUND = {
    "hello",
    "ismaster",
    "isMaster",
    "ping",
    "endSessions",
    "saslStart",
    "saslContinue",
    "buildInfo",
    "killCursors",
}
# mongo-taskqueue has no consumer loop of its own: its callers poll ``next()``; the harness
# polls at the same fixed interval as beanie-tasks' default maximum poll interval.
MONGOTQ_CALLER_POLL = 0.5


class Counting(monitoring.CommandListener):
    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name not in BACKGROUND:
            self.names.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


# ------------------------------------------------------------------ adapters


class Bbq:
    """beanie-batteries-queue 0.4: a Beanie 1 ``Task`` document; pop = find + findAndModify."""

    name = "beanie-batteries-queue"
    package = "beanie-batteries-queue"

    def __init__(self, uri: str, listener: Counting) -> None:
        from motor.motor_asyncio import AsyncIOMotorClient

        self.client = AsyncIOMotorClient(uri, event_listeners=[listener])
        self.database = self.client[f"bench_bbq_{uuid.uuid4().hex[:8]}"]

    async def setup(self) -> None:
        from beanie import init_beanie
        from beanie_batteries_queue import Task  # type: ignore[import-not-found,unused-ignore]

        class BenchJob(Task):  # type: ignore[misc,unused-ignore]
            sent: float = 0.0

        self.job = BenchJob
        await init_beanie(database=self.database, document_models=[BenchJob])

    async def push(self, sent: float = 0.0) -> None:
        await self.job(sent=sent).push()

    async def claim(self) -> Any:
        return await self.job.pop()

    async def finish(self, task: Any) -> None:
        await task.finish()

    async def fail(self, task: Any) -> None:
        await task.fail()

    def sent(self, task: Any) -> float:
        return float(task.sent)

    async def wait_loop(self, on_task: Any, stop: asyncio.Event) -> None:
        """The library's own consumer loop with its default ``sleep_time``."""
        queue = self.job.queue()  # default sleep_time=1
        async for task in queue:
            await on_task(task)
            if stop.is_set():
                return

    async def close(self) -> None:
        await self.client.drop_database(self.database.name)
        self.client.close()

    @staticmethod
    def default_poll() -> str:
        from beanie_batteries_queue import Queue

        default = inspect.signature(Queue.__init__).parameters["sleep_time"].default
        return f"{default} s (Queue sleep_time, fixed)"


class MongoTq:
    """mongo-taskqueue 1.0: ``AsyncTaskQueue`` on Motor; next = findAndModify, on_success = update."""

    name = "mongo-taskqueue"
    package = "mongo-taskqueue"

    def __init__(self, uri: str, listener: Counting) -> None:
        from mongotq import AsyncTaskQueue  # type: ignore[import-not-found,unused-ignore]

        self.queue = AsyncTaskQueue(
            database=f"bench_mtq_{uuid.uuid4().hex[:8]}",
            collection="tasks",
            host=uri,
            client_options={"event_listeners": [listener]},
        )

    async def setup(self) -> None:
        await self.queue.create_index()

    async def push(self, sent: float = 0.0) -> None:
        await self.queue.append({"sent": sent})

    async def claim(self) -> Any:
        return await self.queue.next()

    async def finish(self, task: Any) -> None:
        await self.queue.on_success(task)

    async def fail(self, task: Any) -> None:
        await self.queue.on_failure(task, "bench")

    def sent(self, task: Any) -> float:
        return float(task.payload["sent"])

    async def wait_loop(self, on_task: Any, stop: asyncio.Event) -> None:
        while not stop.is_set():
            task = await self.queue.next()
            if task is None:
                await asyncio.sleep(MONGOTQ_CALLER_POLL)
                continue
            await on_task(task)

    async def close(self) -> None:
        await self.queue.database.client.drop_database(self.queue.database_name)
        await self.queue.close()

    @staticmethod
    def default_poll() -> str:
        return f"none (no consumer loop; callers poll next(); measured with a {MONGOTQ_CALLER_POLL} s caller loop)"


SYSTEMS: dict[str, Any] = {"bbq": Bbq, "mongotq": MongoTq}


# ----------------------------------------------------------------- workloads


async def commands(system: Any, listener: Counting, repeat: int) -> dict[str, Any]:
    """Commands per operation, averaged over ``repeat`` tasks."""
    per_op: dict[str, Counter[str]] = {op: Counter() for op in ("push", "claim", "finish", "fail")}

    async def count(op: str, action: Any) -> Any:
        listener.names.clear()
        value = await action
        per_op[op].update(listener.names)
        return value

    for _ in range(repeat):
        await count("push", system.push())
        task = await count("claim", system.claim())
        await count("finish", system.finish(task))
        await system.push()
        task = await system.claim()
        await count("fail", system.fail(task))
    return {
        op: {"total": sum(c.values()) / repeat, "by_name": {k: v / repeat for k, v in c.items()}}
        for op, c in per_op.items()
    }


async def throughput(system: Any, tasks: int, concurrency: int) -> dict[str, Any]:
    """Drain ``tasks`` pre-filled tasks with ``concurrency`` consumers and a no-op handler."""
    for _ in range(tasks):
        await system.push()
    done = 0

    async def consumer() -> None:
        nonlocal done
        while (task := await system.claim()) is not None:
            await system.finish(task)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(consumer() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"tasks": done, "seconds": elapsed, "per_second": done / elapsed}


async def latency(system: Any, samples: int, seed: int) -> dict[str, Any]:
    """Enqueue-to-start latency seen by an idle consumer in the library's own default loop."""
    rng = random.Random(seed)
    delays: list[float] = []
    claimed = asyncio.Event()
    stop = asyncio.Event()

    async def on_task(task: Any) -> None:
        delays.append(time.time() - system.sent(task))
        await system.finish(task)
        claimed.set()

    consumer = asyncio.ensure_future(system.wait_loop(on_task, stop))
    try:
        await asyncio.sleep(0.5)
        for _ in range(samples):
            claimed.clear()
            await asyncio.sleep(rng.uniform(0.05, 0.6))
            await system.push(sent=time.time())
            await asyncio.wait_for(claimed.wait(), 30)
    finally:
        stop.set()
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await consumer
    return {"seconds": delays}


async def cpu(kind: Any, uri: str, tasks: int, rounds: int) -> dict[str, Any]:
    """Client CPU per task (this process only, ``time.process_time``), as bench/cpu.py counts beanie-tasks'."""
    per_round: dict[str, list[float]] = {"push": [], "claim_finish": []}
    # One instance for every round: beanie-batteries-queue's model cannot be set up twice in one process.
    system = kind(uri, Counting())
    await system.setup()
    try:
        await system.push()  # warm: the connection, the first model
        await system.finish(await system.claim())
        for _ in range(rounds):
            gc.collect()
            started = time.process_time()
            for _ in range(tasks):
                await system.push()
            per_round["push"].append((time.process_time() - started) / tasks * 1e6)
            gc.collect()
            started = time.process_time()
            for _ in range(tasks):
                task = await system.claim()
                if task is None:
                    raise RuntimeError("the backlog ran out")
                await system.finish(task)
            per_round["claim_finish"].append((time.process_time() - started) / tasks * 1e6)
    finally:
        await system.close()
    return per_round


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=sorted(SYSTEMS))
    parser.add_argument("workload", choices=["info", "commands", "throughput", "latency", "cpu"])
    parser.add_argument("uri")
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    kind = SYSTEMS[args.system]
    if args.workload == "info":
        print(
            json.dumps(
                {"name": kind.name, "version": importlib.metadata.version(kind.package), "poll": kind.default_poll()}
            )
        )
        return
    if args.workload == "cpu":
        print(json.dumps(await cpu(kind, args.uri, args.tasks, args.rounds)))
        return
    listener = Counting()
    system = kind(args.uri, listener)
    await system.setup()
    try:
        if args.workload == "commands":
            result = await commands(system, listener, args.repeat)
        elif args.workload == "throughput":
            result = await throughput(system, args.tasks, args.concurrency)
        else:
            result = await latency(system, args.samples, args.seed)
    finally:
        await system.close()
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
