"""Idle commands per second: what a worker with nothing to do sends, by command name.

An idle worker should cost the server next to nothing, however many classes it runs:
one change stream per database waits on the server, and each maintenance round (every
``recovery_interval``) is one probe per database (``beanie_tasks.maintenance``). The
worker runs with its defaults; its start-up is left out (counting starts once it has
sent nothing but getMores for a moment), then every command it sends over ``seconds``
is counted.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from beanie import init_beanie

from beanie_tasks import Task, Worker
from bench.cpu import Recording, settled
from bench.ours import bench_database


class IdleShared(Task):
    """The root of four classes stored in one collection (Beanie inheritance)."""

    class Settings:
        is_root = True
        name = "bench_idle_shared"


class SharedA(IdleShared):
    async def run(self) -> None:
        """Nothing: the worker stays idle."""


class SharedB(IdleShared):
    async def run(self) -> None:
        """Nothing."""


class SharedC(IdleShared):
    async def run(self) -> None:
        """Nothing."""


class SharedD(IdleShared):
    async def run(self) -> None:
        """Nothing."""


class OwnA(Task):
    class Settings:
        name = "bench_idle_a"

    async def run(self) -> None:
        """Nothing."""


class OwnB(Task):
    class Settings:
        name = "bench_idle_b"

    async def run(self) -> None:
        """Nothing."""


class OwnC(Task):
    class Settings:
        name = "bench_idle_c"

    async def run(self) -> None:
        """Nothing."""


class OwnD(Task):
    class Settings:
        name = "bench_idle_d"

    async def run(self) -> None:
        """Nothing."""


# (label, classes the worker runs, every model init_beanie needs)
LAYOUTS: tuple[tuple[str, list[type[Task]], list[type[Task]]], ...] = (
    ("1 class", [OwnA], [OwnA]),
    ("4 classes, 1 collection", [SharedA, SharedB, SharedC, SharedD], [IdleShared, SharedA, SharedB, SharedC, SharedD]),
    ("4 classes, 4 collections", [OwnA, OwnB, OwnC, OwnD], [OwnA, OwnB, OwnC, OwnD]),
)


async def idle_commands(
    uri: str, label: str, classes: list[type[Task]], models: list[type[Task]], seconds: float
) -> dict[str, Any]:
    """Commands per second an idle worker running ``classes`` sends over ``seconds``, by name."""
    counter = Recording()
    async with bench_database(uri, counter) as db:
        await init_beanie(database=db, document_models=models)
        worker = Worker(classes, grace_period=5.0)
        stop = asyncio.Event()
        job = asyncio.create_task(worker.run(stop))
        try:
            await settled(counter)
            counter.reset()
            started = time.monotonic()
            await asyncio.sleep(seconds)
            elapsed = time.monotonic() - started
            names = counter.by_name()
        finally:
            stop.set()
            await asyncio.wait_for(job, 60)
    collections = len({c.get_collection_name() for c in classes})
    return {
        "layout": label,
        "classes": len(classes),
        "collections": collections,
        "seconds": elapsed,
        "per_second": {name: count / elapsed for name, count in sorted(names.items())},
        "total_per_second": sum(names.values()) / elapsed,
    }


async def measure_idle(uri: str, seconds: float) -> list[dict[str, Any]]:
    return [await idle_commands(uri, label, classes, models, seconds) for label, classes, models in LAYOUTS]
