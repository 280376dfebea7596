"""The Worker retries a settle (finish/fail) whose write is lost to the network.

``run()`` arms a ``failCommand`` failpoint on ``update`` just before it returns, so the
Worker's own finish/fail write is the command that fails. The lease is long (60 s) and
every wait here is far shorter, so the task can only end through the Worker's retry,
never through lease recovery.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from beanie import init_beanie
from faultkit import FailPoints, wait_until

from beanie_tasks import State, Task
from beanie_tasks.driver import close_client
from beanie_tasks.worker import Worker

pytestmark = pytest.mark.wire

WRITE_CONCERN_ERROR = {"code": 100, "errmsg": "write applied, acknowledgement failed"}
# The server applies the write, then reports an error the driver labels retryable.
APPLIED_REPLY_LOST = {"writeConcernError": WRITE_CONCERN_ERROR, "errorLabels": ["RetryableWriteError"]}
LEASE = 60.0
# Set by each test: what run() does just before it returns (arm the failpoint).
BEFORE_SETTLE: list[Callable[[], Awaitable[None]]] = []
RUNS: list[Any] = []


class PlannedFailure(Exception):
    """What a task told to fail raises."""


class SettleJob(Task):
    n: int
    should_fail: bool = False

    async def run(self) -> Any:
        RUNS.append(self.id)
        for step in BEFORE_SETTLE:
            await step()
        if self.should_fail:
            raise PlannedFailure("planned")
        return {"n": self.n}

    class Settings:
        name = "settle_jobs"

    class TaskSettings:
        visibility_timeout = LEASE  # no heartbeat (every 20 s) and no expiry within a test
        max_attempts = 1
        poll_interval = 0.1
        recovery_interval = LEASE


FAULTS = {
    # (retryWrites, failCommand data, times): enough failures that the driver's own retry cannot hide them
    "dropped-retryable-writes": (True, {"closeConnection": True}, 3),
    "dropped-no-retryable-writes": (False, {"closeConnection": True}, 2),
    "applied-reply-lost": (False, APPLIED_REPLY_LOST, 1),
}


@pytest.fixture(params=sorted(FAULTS))
async def fault(request: pytest.FixtureRequest, backend: Any, db: Any, failpoints: FailPoints) -> AsyncIterator[str]:
    """Bind SettleJob to a client the failpoint targets, and arm it from inside run()."""
    retry_writes, data, times = FAULTS[request.param]
    client = backend.client(appname=FailPoints.APP_NAME, retryWrites=retry_writes, socketTimeoutMS=5000)
    await init_beanie(database=client[db.name], document_models=[SettleJob])
    RUNS.clear()
    # Finishing and dead-lettering are findAndModify commands (they return the dependents flag).
    BEFORE_SETTLE[:] = [lambda: failpoints.arm(["findAndModify"], times=times, **data)]
    try:
        yield request.param
    finally:
        BEFORE_SETTLE.clear()
        await close_client(client)


async def run_worker_until_settled(task: SettleJob, state: State) -> Worker:
    # Concurrency 1: no claim (also a findAndModify) is sent while the one task settles.
    worker = Worker([SettleJob], concurrency=1, consumer_id="settler", use_change_stream=False, schedules=False)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))

    async def settled() -> bool | str:
        stored = await SettleJob.get(task.id)
        assert stored is not None
        return stored.state is state or f"{stored.state.value}, worker stats {dict(worker.stats)}"

    try:
        await wait_until(settled, timeout=LEASE / 3, what=f"the worker to settle the task {state.value}")
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=30)
    return worker


@pytest.mark.parametrize("outcome", ["finish", "fail"])
async def test_worker_retries_a_settle_lost_to_the_network(fault: str, outcome: str) -> None:
    task = await SettleJob(n=1, should_fail=outcome == "fail").push()
    expected = State.FINISHED if outcome == "finish" else State.FAILED
    worker = await run_worker_until_settled(task, expected)
    stored = await SettleJob.get(task.id)
    assert stored is not None
    assert [task.id] == RUNS, "run() ran exactly once"
    assert stored.attempts == 1 and stored.lease_token is not None  # settled under the first (only) lease
    if outcome == "finish":
        assert stored.result == {"n": 1}
    else:
        assert stored.error is not None and "planned" in stored.error
    assert worker.stats["settle retried"] >= 1, "the worker's own retry settled it"
    assert worker.stats[expected.value.lower()] == 1 and not worker.stats["unsettled"]
    assert not worker.stats["lease lost"]
