"""A run() that raises CancelledError itself is a failed attempt, not a shutdown: it is not rerun forever.

Only a cancellation the worker caused (shutdown, lease lost, task cancelled) releases a task
unspent. A CancelledError that run() raised on its own spends the attempt like any error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import pytest
from workerkit import background, until

from beanie_tasks import Backoff, State, Task, Worker


class SelfCancelling(Task):
    runs: ClassVar[list[Any]] = []

    async def run(self) -> None:
        SelfCancelling.runs.append(self.id)
        raise asyncio.CancelledError()  # not caused by the worker

    class Settings:
        name = "self_cancelling"

    class TaskSettings:
        max_attempts = 2
        backoff = Backoff(base=0.05, jitter=0.0)
        poll_interval = 0.1
        recovery_interval = 0.5


@pytest.fixture(autouse=True)
async def models(init_tasks: Callable[..., Awaitable[None]]) -> None:
    SelfCancelling.runs.clear()
    await init_tasks(SelfCancelling)


async def test_run_raising_cancelled_error_spends_its_attempts() -> None:
    """run() raising CancelledError runs at most max_attempts (2) times and ends FAILED naming CancelledError."""
    pushed = await SelfCancelling().push()
    worker = Worker([SelfCancelling], concurrency=1, use_change_stream=False, schedules=False)
    async with background(worker) as job:

        async def ended_or_looping() -> bool | str:
            document = await SelfCancelling.collection().find_one({"_id": pushed.id}, {"state": 1})
            assert document is not None
            return document["state"] == State.FAILED.value or len(SelfCancelling.runs) > 2 or document["state"]

        await until(ended_or_looping, timeout=3, what="the task to end FAILED", job=job)
    runs = SelfCancelling.runs.count(pushed.id)
    assert runs <= 2, f"run() ran {runs} times: a self-raised CancelledError released the task unspent, again and again"
    after = await SelfCancelling.get(pushed.id)
    assert after is not None and after.state is State.FAILED
    assert after.attempts == 2 and runs == 2
    assert "CancelledError" in (after.error or "")
