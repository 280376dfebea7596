"""Push, pop, finish, fail, cancel and the context manager, on every backend."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from beanie_tasks import Priority, State, Task, TransitionError
from beanie_tasks.task import utcnow


class Email(Task):
    to: str
    body: str = ""


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Email)


async def test_push_pop_finish_round_trip() -> None:
    pushed = await Email(to="a@x").push()
    assert pushed.id is not None and pushed.state is State.CREATED
    popped = await Email.pop()
    assert popped is not None and popped.id == pushed.id
    assert popped.state is State.RUNNING and popped.attempts == 1
    assert popped.lease_token and popped.consumer_id and popped.lease_expires_at
    assert popped.lease_expires_at.tzinfo is not None
    await popped.finish(result={"sent": 1})
    stored = await Email.get(pushed.id)
    assert stored is not None and stored.state is State.FINISHED
    assert stored.result == {"sent": 1} and stored.finished_at is not None
    assert await Email.pop() is None


async def test_high_priority_first_then_fifo() -> None:
    order = [("low", Priority.LOW), ("m1", Priority.MEDIUM), ("h", Priority.HIGH), ("m2", Priority.MEDIUM), ("c", 50)]
    for name, priority in order:
        await Email(to=name, priority=priority).push()
    popped = []
    while (task := await Email.pop()) is not None:
        popped.append(task.to)
    assert popped == ["c", "h", "m1", "m2", "low"]


async def test_invalid_task_raises_before_writing() -> None:
    task = Email(to="ok")
    task.to = 42  # type: ignore[assignment]  # bypasses validation until push
    with pytest.raises(ValidationError):
        await task.push()
    with pytest.raises(ValidationError):
        Email(to="x", priority=1000)
    assert await Email.find_all().count() == 0


async def test_delay_and_run_at_hold_the_task_back() -> None:
    await Email(to="later").push(delay=timedelta(hours=1))
    await Email(to="at").push(run_at=datetime.now(timezone.utc) + timedelta(hours=1))
    await Email(to="soon").push(delay=0.3)
    assert await Email.pop() is None
    await _eventually(lambda: Email.pop(), timeout=3)


async def test_bad_schedule_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await Email(to="x").push(run_at=datetime.now())
    with pytest.raises(TypeError):
        await Email(to="x").push(run_at="tomorrow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        await Email(to="x").push(delay=-1)
    with pytest.raises(ValueError, match="timezone-aware"):
        Email(to="x", run_at=datetime.now())
    assert await Email.find_all().count() == 0


async def test_seed_semantics_on_never_popped_tasks() -> None:
    finished = await Email(to="f").push()
    await finished.finish()
    failed = await Email(to="g").push()
    await failed.fail("nope")
    assert (await Email.get(finished.id)).state is State.FINISHED  # type: ignore[union-attr]
    stored = await Email.get(failed.id)
    assert stored is not None and stored.state is State.FAILED and stored.error == "nope"
    with pytest.raises(TransitionError):
        await finished.finish()


async def test_cancel_created_task_and_refuse_cancelling_finished() -> None:
    task = await Email(to="c").push()
    assert await task.cancel() is True
    assert (await Email.get(task.id)).state is State.CANCELLED  # type: ignore[union-attr]
    assert await task.cancel() is False
    assert await Email.pop() is None


async def test_context_manager_finishes_or_fails_and_reraises() -> None:
    await Email(to="ok").push()
    await Email(to="boom").push()
    async with await _pop() as task:
        assert task.to == "ok"
    with pytest.raises(RuntimeError):
        async with await _pop() as task:
            raise RuntimeError("smtp down")
    counts = await Email.counts()
    assert counts[State.FINISHED] == 1 and counts[State.FAILED] == 1
    failed = await Email.find_one(Email.state == State.FAILED)
    assert failed is not None and failed.error == "RuntimeError: smtp down"


async def test_progress_and_heartbeat_extend_the_lease() -> None:
    await Email(to="p").push()
    task = await _pop()
    first = task.lease_expires_at
    assert first is not None
    await task.set_progress(0.5, "halfway")
    stored = await Email.get(task.id)
    assert stored is not None and stored.progress == 0.5 and stored.progress_message == "halfway"
    assert stored.lease_expires_at is not None and stored.lease_expires_at >= first
    await task.heartbeat()


async def test_a_task_is_pushed_once_and_settled_only_after_a_push() -> None:
    task = Email(to="once")
    with pytest.raises(TransitionError, match="never pushed"):
        await task.finish()
    pushed = await task.push()
    with pytest.raises(TransitionError, match="already pushed"):
        await pushed.push()
    assert await Email.find_all().count() == 1


async def test_a_pushed_task_claimed_by_someone_else_cannot_be_settled_by_the_producer() -> None:
    pushed = await Email(to="raced").push()
    claimed = await _pop()
    with pytest.raises(TransitionError, match="RUNNING, not CREATED"):
        await pushed.finish()
    stored = await Email.get(pushed.id)
    assert stored is not None and stored.state is State.RUNNING and stored.lease_token == claimed.lease_token


async def test_bad_progress_is_rejected() -> None:
    await Email(to="p").push()
    task = await _pop()
    with pytest.raises(TypeError):
        await task.set_progress("half")  # type: ignore[arg-type]


async def _pop() -> Email:
    task = await Email.pop()
    assert task is not None
    return task


async def _eventually(probe: Any, timeout: float) -> Any:
    import asyncio

    deadline = utcnow() + timedelta(seconds=timeout)
    while utcnow() < deadline:
        value = await probe()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")
