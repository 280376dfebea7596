"""A consumer process for the fault tests: N coroutines on ``Task.queue()``, or the real Worker.

    python consumer.py URI DATABASE CLASS --concurrency 4 --consumer-id A [--worker]

SIGTERM stops it gracefully; the tests SIGKILL it to simulate a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from beanie import init_beanie
from fault_tasks import TASK_CLASSES, handle

from beanie_tasks.driver import client_for, close_client


async def serve(task_class: Any, consumer: str, stop: asyncio.Event) -> None:
    async for task in task_class.queue(stop=stop, consumer_id=consumer):
        await handle(task, consumer)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("uri")
    parser.add_argument("database")
    parser.add_argument("task_class", choices=sorted(TASK_CLASSES))
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--consumer-id", default="consumer")
    parser.add_argument("--max-seconds", type=float, default=170.0)
    parser.add_argument("--worker", action="store_true", help="run beanie_tasks.worker.Worker instead of queue()")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format=f"{args.consumer_id} %(levelname)s %(name)s: %(message)s")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.call_later(args.max_seconds, stop.set)
    client = client_for(args.uri, serverSelectionTimeoutMS=2000)
    task_classes = TASK_CLASSES[args.task_class]
    await init_beanie(database=client[args.database], document_models=list(task_classes))
    print("ready", flush=True)
    if args.worker:
        from beanie_tasks.worker import Worker

        worker = Worker(task_classes, concurrency=args.concurrency, consumer_id=args.consumer_id, grace_period=5)
        await worker.run(stop)
    else:
        (task_class,) = task_classes  # the queue() consumer serves one class
        await asyncio.gather(*(serve(task_class, f"{args.consumer_id}/{i}", stop) for i in range(args.concurrency)))
    await close_client(client)


if __name__ == "__main__":
    asyncio.run(main())
