"""The process whose memory the memory benchmark watches: a worker running no-op tasks.

    python -m bench.memory_worker URI DATABASE CONCURRENCY

It runs ``beanie_tasks.Worker`` (change-stream wake-up, heartbeats, recovery: the
real thing) over ``BenchJob``, whose ``run()`` does nothing, until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from beanie import init_beanie

from beanie_tasks import Worker
from beanie_tasks.driver import client_for, close_client
from bench.ours import BenchJob


async def work(uri: str, database: str, concurrency: int) -> None:
    client = client_for(uri)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await init_beanie(database=client[database], document_models=[BenchJob])
        worker = Worker([BenchJob], concurrency=concurrency, grace_period=5.0, schedules=False)
        print("ready", flush=True)
        await worker.run(stop)
    finally:
        await close_client(client)


if __name__ == "__main__":
    asyncio.run(work(sys.argv[1], sys.argv[2], int(sys.argv[3])))
