"""Shutdown after run() returned: an outcome being recorded is recorded, never released.

A worker told to stop while it retries a finish that the network keeps losing must go on
finishing it once run() returned: releasing it then would throw the result away and run the
handler again elsewhere. The grace period bounds how long run() may take, not the settle.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from beanie import init_beanie
from faultkit import FailPoints
from workerkit import background, until

from beanie_tasks import State, Task, Worker
from beanie_tasks.driver import close_client
from beanie_tasks.worker import SETTLE_RETRY_DELAYS

pytestmark = pytest.mark.wire

LEASE = 60.0
# The finish fails this many times: its retries outlast the grace period (0.1 + 0.2 + 0.5 s > 0.2 s).
FAILURES = 3
GRACE = 0.2


class Finishing(Task):
    n: int
    runs: ClassVar[list[Any]] = []
    failpoints: ClassVar[FailPoints | None] = None
    worker: ClassVar[Worker | None] = None

    async def run(self) -> dict[str, int]:
        Finishing.runs.append(self.id)
        assert Finishing.failpoints is not None and Finishing.worker is not None
        # The worker's finish (a findAndModify) loses its connection FAILURES times ...
        await Finishing.failpoints.arm(["findAndModify"], times=FAILURES, closeConnection=True)
        # ... and the worker is told to stop right after run() returns.
        asyncio.get_running_loop().call_soon(Finishing.worker.stop)
        return {"n": self.n}

    class Settings:
        name = "shutdown_settle"

    class TaskSettings:
        visibility_timeout = LEASE  # no heartbeat and no expiry within the test
        poll_interval = 0.1
        recovery_interval = LEASE


@pytest.fixture(autouse=True)
async def targeted(backend: Any, db: Any, failpoints: FailPoints) -> AsyncIterator[None]:
    client = backend.client(appname=FailPoints.APP_NAME, retryWrites=False, socketTimeoutMS=5000)
    await init_beanie(database=client[db.name], document_models=[Finishing])
    Finishing.runs.clear()
    Finishing.failpoints = failpoints
    try:
        yield
    finally:
        Finishing.failpoints = Finishing.worker = None
        await close_client(client)


async def test_stop_while_the_finish_is_retried_still_finishes_the_task() -> None:
    """Stopped with grace_period 0.2 s while retrying a lost finish: the task ends FINISHED, run once, not released."""
    assert sum(SETTLE_RETRY_DELAYS[:FAILURES]) > GRACE
    pushed = await Finishing(n=3).push()
    worker = Worker(
        [Finishing], concurrency=1, consumer_id="stopping", grace_period=GRACE, use_change_stream=False, schedules=False
    )
    Finishing.worker = worker
    async with background(worker, stop_timeout=30) as job:

        async def stopped() -> bool:
            return job.done()

        await until(stopped, timeout=30, what="the worker to drain and stop")
    after = await Finishing.get(pushed.id)
    assert after is not None
    assert Finishing.runs == [pushed.id], "run() ran exactly once"
    assert worker.stats["released"] == 0, f"the finished run was released for another worker: {dict(worker.stats)}"
    assert after.state is State.FINISHED, f"ended {after.state.value} with attempts {after.attempts}"
    assert after.result == {"n": 3} and after.attempts == 1
