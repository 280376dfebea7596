"""Leases: a stale consumer changes nothing, and expired leases are recovered in one update."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from beanie_tasks import LeaseLost, State, Task, TaskCancelled
from beanie_tasks.task import utcnow
from tests.conftest import Backend


class Job(Task):
    name: str

    class TaskSettings:
        visibility_timeout = 0.3
        max_attempts = 3


class OneShot(Task):
    name: str

    class TaskSettings:
        visibility_timeout = 0.3
        max_redeliveries = 0  # a lost lease is final


class Watched(Task):
    """Short leases and frequent recovery, so ``queue()`` notices a dead consumer quickly."""

    name: str

    class TaskSettings:
        visibility_timeout = 0.3
        recovery_interval = 0.2
        max_attempts = 2


class LongLease(Task):
    name: str


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Job, OneShot, Watched, LongLease)


async def wait_until_lease_expires(task: Task) -> None:
    """Bounded wait on the lease's own deadline (BSON keeps milliseconds: add a margin)."""
    assert task.lease_expires_at is not None
    for _ in range(100):
        if utcnow() > task.lease_expires_at:
            await asyncio.sleep(0.01)
            return
        await asyncio.sleep(0.05)
    raise AssertionError("lease did not expire")


async def raw(task_class: type[Task], task: Task) -> dict[str, Any]:
    document = await task_class.collection().find_one({"_id": task.id})
    assert document is not None
    return dict(document)


async def test_stale_consumer_cannot_finish_after_another_claimed() -> None:
    await Job(name="a").push()
    first = await Job.pop(consumer_id="A")
    assert first is not None and first.consumer_id == "A"
    await wait_until_lease_expires(first)
    assert await Job.recover_expired() == 1
    second = await Job.pop(consumer_id="B")
    assert second is not None and second.id == first.id
    # The lost lease gave its attempt back and counts as a redelivery instead.
    assert second.lease_token != first.lease_token and second.attempts == 1 and second.redeliveries == 1
    before = await raw(Job, second)

    with pytest.raises(LeaseLost, match="held by B"):
        await first.finish(result="stale")
    with pytest.raises(LeaseLost):
        await first.fail("stale")
    with pytest.raises(LeaseLost):
        await first.heartbeat()
    with pytest.raises(LeaseLost):
        await first.set_progress(0.9)
    with pytest.raises(LeaseLost):
        await first.release()

    after = await raw(Job, second)
    assert after == before
    assert after["state"] == State.RUNNING.value and after["lease_token"] == second.lease_token
    assert after["result"] is None and after["consumer_id"] == "B"
    await second.finish(result="fresh")
    assert (await raw(Job, second))["result"] == "fresh"


async def test_heartbeat_keeps_an_expired_lease_nobody_else_took() -> None:
    await Job(name="slow").push()
    task = await Job.pop()
    assert task is not None
    await wait_until_lease_expires(task)
    await task.heartbeat()
    assert task.lease_expires_at is not None and task.lease_expires_at > utcnow()
    assert await Job.recover_expired() == 0
    await task.finish()


async def test_a_cancelled_task_tells_its_consumer() -> None:
    await Job(name="c").push()
    task = await Job.pop()
    assert task is not None
    other_view = await Job.get(task.id)
    assert other_view is not None and await other_view.cancel() is True
    with pytest.raises(TaskCancelled):
        await task.heartbeat()
    with pytest.raises(TaskCancelled):
        await task.finish()
    assert (await raw(Job, task))["state"] == State.CANCELLED.value


async def test_recovery_delivers_again_within_max_redeliveries_and_fails_past_it() -> None:
    await Job(name="retry").push()
    await OneShot(name="dead").push()
    retry, dead = await Job.pop(), await OneShot.pop()
    assert retry is not None and dead is not None
    await wait_until_lease_expires(retry)
    await wait_until_lease_expires(dead)

    assert await Job.recover_expired() == 1
    assert await OneShot.recover_expired() == 1

    requeued = await raw(Job, retry)
    assert requeued["state"] == State.CREATED.value and requeued["lease_token"] is None
    assert requeued["expires_at"] is None and requeued["attempts"] == 0 and requeued["redeliveries"] == 1
    failed = await raw(OneShot, dead)
    assert failed["state"] == State.FAILED.value
    assert "lease expired" in failed["error"] and "max_redeliveries is 0" in failed["error"]
    assert failed["finished_at"] is not None and failed["lease_token"] is None
    with pytest.raises(LeaseLost):
        await dead.finish()
    assert await Job.recover_expired() == 0, "recovery is idempotent"


async def test_live_leases_are_left_alone() -> None:
    await LongLease(name="live").push()
    task = await LongLease.pop()
    assert task is not None
    assert await LongLease.recover_expired() == 0
    assert (await raw(LongLease, task))["state"] == State.RUNNING.value


@pytest.mark.wire
async def test_recovery_is_one_update_command_plus_one_indexed_repair_read(backend: Backend) -> None:
    for name in ("x", "y"):
        await Job(name=name).push()
    await OneShot(name="z").push()
    claimed = [await Job.pop(), await Job.pop(), await OneShot.pop()]
    for task in claimed:
        assert task is not None
        await wait_until_lease_expires(task)
    backend.counter.reset()
    assert await Job.recover_expired() == 2
    # One update recovers every expired lease; one find (on the partial bt_dependents index)
    # looks for ended tasks whose dependents a dead finisher never told, whatever their class.
    assert backend.counter.by_name() == {"update": 1, "find": 1}
    assert backend.counter.last["find"]["filter"]["dependents_pending"] is True
    backend.counter.reset()
    assert await OneShot.recover_expired() == 1
    assert backend.counter.by_name() == {"update": 1, "find": 1}


async def test_queue_recovers_a_dead_consumers_task_by_itself() -> None:
    await Watched(name="orphan").push()
    dead = await Watched.pop(consumer_id="dead")
    assert dead is not None

    async def next_from_queue() -> Watched:
        stop = asyncio.Event()
        async for task in Watched.queue(stop=stop, consumer_id="alive"):
            return task
        raise AssertionError("queue ended")

    rescued = await asyncio.wait_for(next_from_queue(), timeout=10)
    assert rescued.id == dead.id and rescued.consumer_id == "alive" and rescued.attempts == 1
    assert rescued.redeliveries == 1
    await rescued.finish()
    with pytest.raises(LeaseLost):
        await dead.finish()
