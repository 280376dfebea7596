"""Using a task class that was never passed to ``init_beanie`` fails loudly and early.

Pushing it raises a ``TaskError`` that names the class and ``init_beanie``, with nothing
written anywhere; a worker given it raises the same kind of error at once instead of
looping on a class it can never claim.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from beanie_tasks import TaskError, Worker
from beanie_tasks.task import Task


class Registered(Task):
    n: int = 0

    async def run(self) -> int:
        return self.n


class Forgotten(Task):
    n: int = 0

    async def run(self) -> int:
        return self.n


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Registered)


async def documents_everywhere(db: Any) -> dict[str, int]:
    names = await db.list_collection_names()
    return {name: await db[name].count_documents({}) for name in names if not name.startswith("system.")}


def explains(error: BaseException) -> None:
    message = str(error)
    assert "init_beanie" in message and "Forgotten" in message, message


async def test_pushing_an_unregistered_class_raises_and_writes_nothing(db: Any) -> None:
    """Forgotten(...).push() raises a TaskError naming the class and init_beanie; no collection holds a document."""
    with pytest.raises(TaskError) as raised:
        await Forgotten(n=1).push()
    explains(raised.value)
    counts = await documents_everywhere(db)
    assert all(n == 0 for n in counts.values()), counts
    await Registered(n=1).push()  # the registered class is unaffected
    assert sum((await documents_everywhere(db)).values()) == 1


async def test_a_worker_given_an_unregistered_class_raises_at_once(db: Any) -> None:
    """Worker([Forgotten]).run() raises the same kind of TaskError within 5 s instead of looping."""
    try:
        with pytest.raises(TaskError) as raised:
            await asyncio.wait_for(Worker([Forgotten], concurrency=1, grace_period=0).run(), 5)
    except asyncio.TimeoutError:
        pytest.fail("Worker([Forgotten]).run() was still running after 5 s instead of raising")
    explains(raised.value)
