"""A class's concurrency limits hold for every consumer, not only for the Worker.

With ``key_concurrency = 1`` at most one task per ``concurrency_key`` is RUNNING, whether
tasks are claimed with ``pop()``, ``claim_batch()`` or ``queue()``; ``pop(ignore_limits=True)``
is the documented, explicit bypass. A slot is freed when its task ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from beanie_tasks import State, Task, claim_batch
from beanie_tasks.testing import eventually


class Capped(Task):
    class TaskSettings:
        key_concurrency = 1

    n: int = 0

    async def run(self) -> int:
        return self.n


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Capped)


async def three_on_one_key() -> list[Capped]:
    return [await Capped(n=n, concurrency_key="k").push() for n in range(3)]


async def running_count() -> int:
    return int(await Capped.collection().count_documents({"state": State.RUNNING.value}))


async def test_pop_respects_key_concurrency() -> None:
    """Three pop() calls on one key capped at 1 return one task, then None, None while the first is RUNNING."""
    await three_on_one_key()
    first = await Capped.pop()
    assert first is not None
    second, third = await Capped.pop(), await Capped.pop()
    assert (second, third) == (None, None), f"{await running_count()} tasks with concurrency_key 'k' are RUNNING"
    assert await running_count() == 1


async def test_the_slot_is_freed_when_the_task_ends() -> None:
    """While the first task runs the key is full; once it finishes the next pop() returns the next task."""
    pushed = await three_on_one_key()
    first = await Capped.pop()
    assert first is not None and first.id == pushed[0].id
    assert await Capped.pop() is None, "the key is full while the first task runs"
    await first.finish()
    second = await Capped.pop()
    assert second is not None and second.id == pushed[1].id
    assert await Capped.pop() is None, "the key is full again"


async def test_claim_batch_respects_key_concurrency() -> None:
    """claim_batch(Capped, 3) on three tasks of one key capped at 1 claims at most one."""
    await three_on_one_key()
    claimed = await claim_batch(Capped, 3)
    assert len(claimed) <= 1, f"claim_batch claimed {len(claimed)} tasks of a key capped at 1"
    assert await running_count() <= 1


async def test_queue_respects_key_concurrency() -> None:
    """Capped.queue() yields one of three tasks of one key capped at 1, and no other within the next second
    (nothing is finished meanwhile)."""
    await three_on_one_key()
    stop = asyncio.Event()
    yielded: list[Capped] = []

    async def consume() -> None:
        async for task in Capped.queue(stop=stop):
            yielded.append(task)

    consumer = asyncio.create_task(consume())

    async def first_yielded() -> bool:
        return bool(yielded)

    try:
        await eventually(first_yielded, timeout=10)
        await asyncio.sleep(1.0)  # the guarantee is about what happens within this second
    finally:
        stop.set()
        try:
            await asyncio.wait_for(consumer, 10)
        except asyncio.TimeoutError:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
    assert len(yielded) == 1, f"queue() yielded {len(yielded)} tasks of a key capped at 1"


async def test_ignore_limits_is_the_explicit_bypass() -> None:
    """pop(ignore_limits=True) claims a task although its key is full."""
    await three_on_one_key()
    first = await Capped.pop()
    assert first is not None
    bypass = await Capped.pop(ignore_limits=True)
    assert bypass is not None and bypass.id != first.id
    assert await running_count() == 2
