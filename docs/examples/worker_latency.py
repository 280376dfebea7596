"""Measure enqueue-to-start latency of a worker: woken by a change stream, then by polling alone.

Run it with ``python docs/examples/worker_latency.py [SAMPLES]``; docs/workers.md quotes its output.
Each sample pushes one task to an idle worker and reads how long after the push the
worker's claim stamped ``started_at``.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import uuid

from beanie import init_beanie

from beanie_tasks import Task, Worker
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.embedded import server_uri

DATABASE = f"example_latency_{uuid.uuid4().hex[:8]}"


class Ping(Task):
    class TaskSettings:
        poll_interval = 0.5  # the longest a polling worker sleeps while idle (the default)

    async def run(self) -> None:
        return None


async def measure(use_change_stream: bool, samples: int) -> list[float]:
    worker = Worker([Ping], concurrency=1, use_change_stream=use_change_stream, schedules=False)
    stop = asyncio.Event()
    job = asyncio.create_task(worker.run(stop))
    await asyncio.sleep(1.0)  # let the worker settle into its idle wait
    latencies = []
    for _ in range(samples):
        await asyncio.sleep(random.uniform(0.3, 0.8))  # arrive at a random point of an idle wait
        task = await Ping().push()
        done = await task.wait(timeout=10)
        assert done.started_at is not None
        latencies.append((done.started_at - done.created_at).total_seconds() * 1000)
    stop.set()
    await job
    return latencies


async def main(samples: int) -> None:
    with server_uri() as uri:
        client = client_for(uri)
        try:
            await init_beanie(database=client[DATABASE], document_models=[Ping])
            for name, streaming in (("change stream", True), ("polling", False)):
                values = sorted(await measure(streaming, samples))
                p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
                print(f"{name:>13}: median {statistics.median(values):6.1f} ms, p95 {p95:6.1f} ms, n={len(values)}")
        finally:
            await client.drop_database(DATABASE)
            await close_client(client)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5))
