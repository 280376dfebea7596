"""Expiry: a TTL index on a field set only at terminal transitions."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from beanie_tasks import State, Task
from beanie_tasks.task import utcnow


class Shortlived(Task):
    class TaskSettings:
        ttl = 1
        max_attempts = 2


class Kept(Task):
    """Default settings: ended tasks are kept forever."""


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Shortlived, Kept)


async def test_ttl_index_is_on_expires_at() -> None:
    indexes = await Shortlived.collection().index_information()
    assert list(indexes["bt_expiry"]["key"]) == [("expires_at", 1)]
    assert indexes["bt_expiry"]["expireAfterSeconds"] == 0


async def test_expires_at_is_set_only_at_terminal_transitions() -> None:
    pushed = await Shortlived().push()
    assert pushed.expires_at is None
    running = await Shortlived.pop()
    assert running is not None and running.expires_at is None
    await running.fail("retry me")
    retried = await Shortlived.get(pushed.id)
    assert retried is not None and retried.state is State.CREATED and retried.expires_at is None
    await Shortlived.collection().update_one({"_id": pushed.id}, {"$set": {"run_at": utcnow()}})
    running = await Shortlived.pop()
    assert running is not None
    await running.finish()
    ended = await Shortlived.get(pushed.id)
    assert ended is not None and ended.finished_at is not None and ended.expires_at is not None
    assert ended.expires_at - ended.finished_at == timedelta(seconds=1)


@pytest.mark.parametrize("end", ["finish", "fail", "cancel"])
async def test_every_terminal_state_gets_an_expiry(end: str) -> None:
    task = await Kept().push() if end == "cancel" else await Shortlived(max_attempts=1).push()
    if end == "finish":
        await task.finish()
    elif end == "fail":
        await task.fail("x")
    else:
        await task.cancel()
    stored = await type(task).collection().find_one({"_id": task.id})
    assert stored is not None
    if end == "cancel":
        assert stored["expires_at"] is None, "default: keep forever"
    else:
        assert stored["expires_at"] is not None


async def test_default_keeps_ended_tasks_forever() -> None:
    task = await Kept().push()
    await task.finish()
    stored = await Kept.get(task.id)
    assert stored is not None and stored.state is State.FINISHED and stored.expires_at is None


@pytest.mark.wire
async def test_an_expired_task_is_actually_deleted_and_live_ones_stay() -> None:
    done = await Shortlived().push()
    waiting = await Shortlived().push()
    running = await Shortlived.pop()
    assert running is not None and running.id == done.id
    await running.finish()
    queued = await Shortlived().push()
    claimed = await Shortlived.pop()
    assert claimed is not None and claimed.id == waiting.id
    for _ in range(200):  # the session server sweeps every second; allow up to ~20s
        if await Shortlived.get(done.id) is None:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the finished task was not deleted by the TTL monitor")
    assert {t.id for t in await Shortlived.find_all().to_list()} == {waiting.id, queued.id}
