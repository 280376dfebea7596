"""Dedupe keys: a duplicate push returns the in-flight task; the key is free once that task ends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import ValidationError

from beanie_tasks import State, Task
from beanie_tasks.task import utcnow


class Report(Task):
    month: str

    class TaskSettings:
        visibility_timeout = 0.2
        max_redeliveries = 0  # a lost lease ends it, so "recovered" below is a terminal end


class Retried(Task):
    class TaskSettings:
        max_attempts = 2


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Report, Retried)


async def test_duplicate_push_returns_the_in_flight_task() -> None:
    first = await Report(month="2024-05", dedupe_key="report:2024-05").push()
    twin = Report(month="2024-05 again", dedupe_key="report:2024-05")
    returned = await twin.push()
    assert returned is not twin and twin.id is None, "the duplicate itself is not stored"
    assert returned.id == first.id and returned.month == "2024-05" and returned.state is State.CREATED
    assert await Report.find_all().count() == 1


async def test_duplicate_of_a_running_task_returns_it_running() -> None:
    await Report(month="m", dedupe_key="k").push()
    running = await Report.pop()
    assert running is not None
    returned = await Report(month="m2", dedupe_key="k").push()
    assert returned.id == running.id and returned.state is State.RUNNING


async def test_tasks_without_a_key_never_clash() -> None:
    for _ in range(3):
        await Report(month="x").push()
    assert await Report.find_all().count() == 3


async def test_different_keys_do_not_clash() -> None:
    a = await Report(month="a", dedupe_key="a").push()
    b = await Report(month="b", dedupe_key="b").push()
    assert a.id != b.id


async def test_empty_key_is_rejected() -> None:
    with pytest.raises(ValidationError):
        Report(month="x", dedupe_key="")


async def end_by(how: str, task: Report) -> None:
    if how == "finished":
        await task.finish()
    elif how == "failed":
        await task.fail("boom")
    elif how == "cancelled":
        await task.cancel()
    else:  # the consumer died and recovery found no redeliveries left
        assert task.lease_expires_at is not None
        await asyncio.sleep(max(0.0, (task.lease_expires_at - utcnow()).total_seconds()) + 0.05)
        assert await Report.recover_expired() == 1


@pytest.mark.parametrize("how", ["finished", "failed", "cancelled", "recovered"])
async def test_key_is_reusable_once_the_task_ended(how: str) -> None:
    await Report(month="old", dedupe_key="monthly").push()
    task = await Report.pop()
    assert task is not None
    await end_by(how, task)
    ended = await Report.collection().find_one({"_id": task.id})
    assert ended is not None and ended["state"] in {"FINISHED", "FAILED", "CANCELLED"}
    assert "dedupe_slot" not in ended and ended["dedupe_key"] == "monthly", "the key stays readable"
    fresh = await Report(month="new", dedupe_key="monthly").push()
    assert fresh.id != task.id and fresh.month == "new" and fresh.state is State.CREATED


async def test_a_retried_task_keeps_its_key() -> None:
    first = await Retried(dedupe_key="sync").push()
    task = await Retried.pop()
    assert task is not None
    await task.fail("transient")
    assert task.state is State.CREATED
    again = await Retried(dedupe_key="sync").push()
    assert again.id == first.id and again.attempts == 1
