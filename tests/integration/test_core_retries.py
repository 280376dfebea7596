"""Retries: opt-in per class or per task, exponential backoff with jitter, then FAILED."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from beanie_tasks import Backoff, State, Task
from beanie_tasks.task import utcnow

SLACK = timedelta(seconds=2)  # clock and millisecond rounding between "now" here and in fail()


class Flaky(Task):
    n: int = 0

    class TaskSettings:
        max_attempts = 3
        backoff = Backoff(base=100, factor=2, maximum=1000, jitter=0)


class Jittery(Task):
    class TaskSettings:
        max_attempts = 10
        backoff = Backoff(base=100, factor=2, maximum=10_000, jitter=0.5)


class Plain(Task):
    """Default settings: no retries."""


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Flaky, Jittery, Plain)


async def make_due(task_class: type[Task]) -> None:
    """Skip the backoff wait by moving every waiting task's run_at to now."""
    await task_class.collection().update_many({"state": State.CREATED.value}, {"$set": {"run_at": utcnow()}})


async def pop(task_class: type[Task]) -> Any:
    task = await task_class.pop()
    assert task is not None
    return task


async def test_class_retries_back_off_exponentially_then_fail() -> None:
    pushed = await Flaky().push()
    assert pushed.max_attempts == 3
    for attempt, wait in ((1, 100), (2, 200)):
        task = await pop(Flaky)
        assert task.attempts == attempt
        before = utcnow()
        await task.fail(RuntimeError(f"try {attempt}"))
        stored = await Flaky.get(pushed.id)
        assert stored is not None and stored.state is State.CREATED
        assert stored.last_error == f"RuntimeError: try {attempt}" and stored.error is None
        assert stored.lease_token is None
        assert stored.run_at is not None
        assert before + timedelta(seconds=wait) - SLACK <= stored.run_at <= before + timedelta(seconds=wait) + SLACK
        assert stored.expires_at is None and stored.finished_at is None
        assert await Flaky.pop() is None, "not before the backoff delay"
        await make_due(Flaky)
    last = await pop(Flaky)
    assert last.attempts == 3
    await last.fail("third strike")
    stored = await Flaky.get(pushed.id)
    assert stored is not None and stored.state is State.FAILED and stored.error == "third strike"
    assert stored.last_error == "RuntimeError: try 2", "the error of the attempt before stays"
    assert stored.attempts == 3 and stored.finished_at is not None


async def test_jitter_spreads_retries_of_tasks_that_failed_together() -> None:
    for _ in range(6):
        await Jittery().push()
    before = utcnow()
    while (task := await Jittery.pop()) is not None:
        await task.fail("boom")
    delays = [(t.run_at - before).total_seconds() for t in await Jittery.find_all().to_list() if t.run_at]
    assert len(delays) == 6
    assert all(50 - 2 <= d <= 100 + 2 for d in delays)
    assert len({round(d, 2) for d in delays}) > 1


async def test_per_task_max_attempts_overrides_the_class_default() -> None:
    pushed = await Plain(max_attempts=2).push()
    task = await pop(Plain)
    await task.fail("once")
    assert task.state is State.CREATED
    await make_due(Plain)
    task = await pop(Plain)
    await task.fail("twice")
    stored = await Plain.get(pushed.id)
    assert stored is not None and stored.state is State.FAILED and stored.attempts == 2


async def test_default_settings_fail_at_once() -> None:
    await Plain().push()
    task = await pop(Plain)
    await task.fail("no retries by default")
    assert task.state is State.FAILED
    assert (await Plain.counts())[State.FAILED] == 1


async def test_retry_false_dead_letters_despite_attempts_left() -> None:
    await Flaky().push()
    task = await pop(Flaky)
    await task.fail(ValueError("bad input"), retry=False)
    stored = await Flaky.get(task.id)
    assert stored is not None and stored.state is State.FAILED and stored.attempts == 1
    assert stored.error == "ValueError: bad input"


async def test_retry_in_overrides_the_backoff() -> None:
    await Flaky().push()
    task = await pop(Flaky)
    before = utcnow()
    await task.fail("later", retry_in=timedelta(seconds=5))
    stored = await Flaky.get(task.id)
    assert stored is not None and stored.run_at is not None
    assert before + timedelta(seconds=5) - SLACK <= stored.run_at <= before + timedelta(seconds=5) + SLACK


async def test_failing_a_never_popped_task_counts_an_attempt() -> None:
    pushed = await Flaky().push()
    await pushed.fail("rejected before running")
    stored = await Flaky.get(pushed.id)
    assert stored is not None and stored.state is State.CREATED and stored.attempts == 1
    assert stored.run_at is not None and stored.run_at > utcnow() + timedelta(seconds=50)


async def test_context_manager_schedules_a_retry_and_reraises() -> None:
    await Flaky().push()
    task = await pop(Flaky)
    with pytest.raises(ConnectionError):
        async with task:
            raise ConnectionError("smtp down")
    stored = await Flaky.get(task.id)
    assert stored is not None and stored.state is State.CREATED
    assert stored.last_error == "ConnectionError: smtp down" and stored.error is None
    assert stored.run_at is not None and stored.run_at > utcnow()


async def test_release_gives_the_attempt_back() -> None:
    await Flaky().push()
    task = await pop(Flaky)
    await task.release()
    stored = await Flaky.get(task.id)
    assert stored is not None and stored.state is State.CREATED and stored.attempts == 0
    again = await pop(Flaky)
    assert again.attempts == 1
