"""``async with task:`` under cancellation: an interrupted block gives the task back unspent.

Cancelling the consumer, or a KeyboardInterrupt / SystemExit inside the block, is not the
task's failure: ``__aexit__`` releases it (CREATED again, the attempt given back, claimable
at once) instead of failing it with "CancelledError".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from workerkit import until

from beanie_tasks import State, Task


class Guarded(Task):
    n: int = 0

    class Settings:
        name = "context_cancel"


@pytest.fixture(autouse=True)
async def models(init_tasks: Callable[..., Awaitable[None]]) -> None:
    await init_tasks(Guarded)


async def stored(task_id: Any) -> dict[str, Any]:
    document = await Guarded.collection().find_one({"_id": task_id})
    assert document is not None
    return dict(document)


async def assert_released_unspent(task_id: Any) -> None:
    after = await stored(task_id)
    assert after["state"] == State.CREATED.value, f"the task ended {after['state']}: {after.get('error')}"
    assert after["attempts"] == 0 and after["lease_token"] is None
    again = await Guarded.pop()
    assert again is not None and again.id == task_id and again.attempts == 1


async def test_cancelled_consumer_releases_its_task() -> None:
    """A consumer cancelled inside ``async with`` leaves the task CREATED with attempts 0, not FAILED."""
    pushed = await Guarded().push()
    inside = asyncio.Event()

    async def consumer() -> None:
        task = await Guarded.pop()
        assert task is not None
        async with task:
            inside.set()
            await asyncio.sleep(10)

    job = asyncio.create_task(consumer())

    async def entered() -> bool:
        if job.done():
            job.result()  # raise what the consumer raised
        return inside.is_set()

    await until(entered, timeout=10, what="the consumer to enter the block")
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    await assert_released_unspent(pushed.id)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
async def test_interrupt_inside_the_block_releases_the_task(interrupt: type[BaseException]) -> None:
    """KeyboardInterrupt or SystemExit raised inside ``async with`` propagates, and the task is released unspent."""
    pushed = await Guarded().push()
    task = await Guarded.pop()
    assert task is not None and task.id == pushed.id
    with pytest.raises(interrupt):
        async with task:
            raise interrupt()
    await assert_released_unspent(pushed.id)
