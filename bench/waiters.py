"""A thousand concurrent ``wait()`` calls on a default connection pool.

Every ``wait()`` on one collection shares one change stream, but each reads its task
when it starts and again when it is woken: 1,000 waiters are 2,000 reads through a
pool of 100 connections. The question is whether they all return promptly once their
tasks end, and whether pushes made meanwhile (the same client, another collection)
stall behind them. Push latency is measured before the waiters start (the baseline),
while they start, while they wait, and while they all wake up at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from beanie import init_beanie

from beanie_tasks import State, Task
from beanie_tasks.task import utcnow
from bench.cpu import Recording
from bench.ours import bench_database, stored_form

WAIT_TIMEOUT = 300.0


class Awaited(Task):
    """The tasks the waiters wait for; nothing runs them, the harness ends them all in one update."""

    class Settings:
        name = "bench_awaited"


class Probe(Task):
    """What is pushed while the waiters wait, in a collection of its own."""

    class Settings:
        name = "bench_probes"


async def timed_pushes(count: int) -> list[float]:
    """Seconds each of ``count`` sequential pushes took."""
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        await Probe().push()
        seconds.append(time.perf_counter() - started)
    return seconds


async def pushes_until(done: asyncio.Event) -> list[float]:
    """Push one probe after another until ``done`` is set; seconds per push."""
    seconds: list[float] = []
    while not done.is_set():
        seconds += await timed_pushes(1)
    return seconds


async def measure_waiters(uri: str, waiters: int, pushes: int) -> dict[str, Any]:
    counter = Recording()
    out: dict[str, Any] = {"waiters": waiters}
    async with bench_database(uri, counter) as db:
        await init_beanie(database=db, document_models=[Awaited, Probe])
        out["pool"] = db.client.options.pool_options.max_pool_size
        await timed_pushes(2)  # connections and caches, not counted
        out["push_baseline"] = await timed_pushes(pushes)
        documents = [stored_form(Awaited(run_at=utcnow(), max_attempts=1)) for _ in range(waiters)]
        await Awaited.collection().insert_many(documents)
        tasks = [Awaited.model_validate(document) for document in documents]
        returned: list[float] = []

        async def wait_for(task: Awaited) -> None:
            await task.wait(timeout=WAIT_TIMEOUT)
            returned.append(time.perf_counter())

        counter.reset()
        started = time.perf_counter()
        jobs = [asyncio.create_task(wait_for(task)) for task in tasks]
        out["push_while_starting"] = await timed_pushes(pushes)
        await asyncio.sleep(1.0)  # every waiter has read its task and sleeps on the shared stream
        out["start_commands"] = dict(counter.by_name())
        out["start_seconds"] = time.perf_counter() - started
        counter.reset()
        out["push_while_waiting"] = await timed_pushes(pushes)
        if returned:
            raise RuntimeError(f"{len(returned)} waiters returned before their tasks ended")
        all_back = asyncio.Event()
        pusher = asyncio.create_task(pushes_until(all_back))
        ended = time.perf_counter()
        now = utcnow()
        await Awaited.collection().update_many(
            {"state": State.CREATED.value},
            {"$set": {"state": State.FINISHED.value, "finished_at": now, "result": None}},
        )
        out["end_update_seconds"] = time.perf_counter() - ended
        try:
            await asyncio.wait_for(asyncio.gather(*jobs), WAIT_TIMEOUT)
        finally:
            all_back.set()
            out["push_while_waking"] = await pusher
        out["end_commands"] = dict(counter.by_name())
        out["first_return_seconds"] = min(returned) - ended
        out["all_returned_seconds"] = max(returned) - ended
        out["median_return_seconds"] = sorted(returned)[len(returned) // 2] - ended
    return out
