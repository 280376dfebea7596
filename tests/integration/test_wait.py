"""Task.wait: a producer awaits the outcome of what it pushed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from beanie_tasks import State, Task, TaskFailed, TransitionError, WaitTimeout
from beanie_tasks.driver import open_change_stream


class Square(Task):
    n: int


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Square)


async def consume(outcome: str, delay: float = 0.2) -> None:
    """Play the worker: claim after ``delay`` and end the task as ``outcome`` says."""
    await asyncio.sleep(delay)
    task = await Square.pop()
    assert task is not None
    if outcome == "finish":
        await task.finish(task.n * task.n)
    elif outcome == "fail":
        await task.fail(ValueError("negative"))
    else:
        await task.cancel()


async def test_wait_returns_the_finished_task_with_its_result() -> None:
    task = await Square(n=7).push()
    consumer = asyncio.create_task(consume("finish"))
    done = await task.wait(timeout=10)
    await consumer
    assert done.state is State.FINISHED and done.result == 49 and done.id == task.id


async def test_wait_on_an_already_finished_task_returns_at_once() -> None:
    task = await Square(n=2).push()
    await consume("finish", delay=0)
    assert (await task.wait(timeout=0.01)).result == 4


@pytest.mark.parametrize("outcome, state", [("fail", State.FAILED), ("cancel", State.CANCELLED)])
async def test_wait_raises_task_failed_for_failed_and_cancelled(outcome: str, state: State) -> None:
    task = await Square(n=-1).push()
    consumer = asyncio.create_task(consume(outcome))
    with pytest.raises(TaskFailed, match=state.value) as caught:
        await task.wait(timeout=10)
    await consumer
    ended = caught.value.task
    assert isinstance(ended, Square) and ended.state is state


async def test_wait_times_out_with_wait_timeout() -> None:
    task = await Square(n=1).push()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(WaitTimeout, match="still CREATED"):
        await task.wait(timeout=0.3)
    assert loop.time() - started < 5
    with pytest.raises(TimeoutError):  # WaitTimeout is a TimeoutError too
        await task.wait(timeout=0)


async def test_wait_needs_a_pushed_task() -> None:
    with pytest.raises(TransitionError, match="never pushed"):
        await Square(n=1).wait()
    task = await Square(n=1).push()
    await task.delete()
    with pytest.raises(TransitionError, match="no longer exists"):
        await task.wait(timeout=1)


@pytest.mark.wire
async def test_wait_is_woken_by_a_change_stream() -> None:
    stream = await open_change_stream(Square.collection(), [])
    assert stream is not None, "the wire backends have change streams"
    await stream.close()
    task = await Square(n=3).push()
    consumer = asyncio.create_task(consume("finish", delay=0.3))
    loop = asyncio.get_running_loop()
    # A long poll interval: only the change stream can wake the waiter soon after the finish.
    done = await task.wait(timeout=10, poll_interval=30)
    woke_after = loop.time()
    await consumer
    assert done.result == 9
    finished_at = done.finished_at
    assert finished_at is not None
    assert woke_after - loop.time() < 1
