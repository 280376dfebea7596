"""A handler that outlives its lease loses it, and cannot overwrite the new owner's result."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fault_tasks import Job
from faultkit import wait_until

from beanie_tasks import LeaseLost, State


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Job)


async def test_slow_handler_loses_its_lease_and_cannot_overwrite(caplog: pytest.LogCaptureFixture) -> None:
    pushed = await Job(n=1, max_attempts=3).push()
    slow = await Job.pop(consumer_id="slow")
    assert slow is not None
    # The slow handler misses its heartbeats; recovery hands the task back out.
    await wait_until(Job.recover_expired, timeout=15, what="the slow handler's lease to expire")
    fast = await Job.pop(consumer_id="fast")
    assert fast is not None and fast.id == pushed.id and fast.attempts == 1 and fast.redeliveries == 1
    assert fast.lease_token != slow.lease_token

    caplog.set_level(logging.WARNING, logger="beanie_tasks")
    with pytest.raises(LeaseLost, match=r"lease was lost .*held by fast"):
        await slow.heartbeat()
    await fast.finish({"by": "fast"})
    with pytest.raises(LeaseLost, match="FINISHED"):
        await slow.finish({"by": "slow"})
    with pytest.raises(LeaseLost):
        await slow.fail("too late")

    stored = await Job.get(pushed.id)
    assert stored is not None and stored.state is State.FINISHED
    assert stored.result == {"by": "fast"} and stored.lease_token == fast.lease_token
    assert stored.attempts == 1 and stored.redeliveries == 1  # the slow run's lost lease cost a redelivery
    lost = [r for r in caplog.records if "lease was lost" in r.getMessage()]
    assert len(lost) == 3 and all(r.levelno == logging.WARNING for r in lost)
    assert str(pushed.id) in lost[0].getMessage()


async def test_repeating_a_finish_is_success_not_lease_lost() -> None:
    """What a retry after a lost acknowledgement looks like: the second call finds its own result."""
    await Job(n=1).push()
    task = await Job.pop()
    assert task is not None
    await task.finish("once")
    await task.finish("once")
    stored = await Job.get(task.id)
    assert stored is not None and stored.state is State.FINISHED and stored.result == "once"


async def test_a_stale_finish_after_recovery_and_reclaim_is_refused() -> None:
    """Idempotence is tied to the lease token: another owner's FINISHED is never mistaken for ours."""
    await Job(n=1, max_attempts=3).push()
    first = await Job.pop()
    assert first is not None
    await wait_until(Job.recover_expired, timeout=15, what="the lease to expire")
    second = await Job.pop()
    assert second is not None
    await second.finish("second")
    with pytest.raises(LeaseLost):
        await first.finish("first")
