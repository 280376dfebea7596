"""Task classes and the handler shared by the fault tests and their consumer subprocesses.

Every execution is recorded in a separate ``executions`` collection, so a test can
prove afterwards how often each task ran, failed and finished.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from beanie import Link
from pymongo.errors import ConnectionFailure

from beanie_tasks import Backoff, DependencyType, LeaseLost, Task, depends_on

EXECUTIONS = "executions"
# A transition that cannot reach the server is retried for this long before giving up
# (the task then stays RUNNING and recovery hands it to someone else).
TRANSITION_PATIENCE = 60.0


class PlannedFailure(Exception):
    """What a task raises on the attempts it is told to fail."""


class Job(Task):
    """Short leases, so a killed consumer's tasks come back within seconds."""

    n: int
    fail_times: int = 0
    hang_first: bool = False
    work: float = 0.0

    async def run(self) -> Any:
        """The work itself: the Worker settles its outcome, ``handle`` does for queue() consumers."""
        await record(self, "start", self.consumer_id or "?")
        if self.hang_first and self.redeliveries == 0:
            await asyncio.sleep(3600)  # killed here by the test
        if self.work:
            await asyncio.sleep(self.work)
        return await planned_outcome(self)

    class Settings:
        name = "fault_jobs"

    class TaskSettings:
        visibility_timeout = 2.0
        max_attempts = 3
        backoff = Backoff(base=0.05, jitter=0)
        poll_interval = 0.1
        recovery_interval = 0.3


class SoakJob(Task):
    n: int
    fail_times: int = 0

    async def run(self) -> Any:
        await record(self, "start", self.consumer_id or "?")
        return await planned_outcome(self)

    class Settings:
        name = "soak_jobs"

    class TaskSettings:
        # Long leases: in the soak nothing dies, so no lease may expire under load.
        visibility_timeout = 120.0
        max_attempts = 3
        backoff = Backoff(base=0.05, factor=1.0, jitter=0)
        poll_interval = 0.2
        recovery_interval = 10.0


class SoakChild(Task):
    """Runs only after its parent finished; ends FAILED unrun if the parent failed."""

    parent: Link[SoakJob] = depends_on(DependencyType.DIRECT)
    n: int
    fail_times: int = 0

    class Settings:
        name = "soak_children"

    class TaskSettings:
        # Long leases: in the soak nothing dies, so no lease may expire under load.
        visibility_timeout = 120.0
        max_attempts = 3
        backoff = Backoff(base=0.05, factor=1.0, jitter=0)
        poll_interval = 0.2
        recovery_interval = 10.0

    async def run(self) -> Any:
        await record(self, "start", self.consumer_id or "?")
        return await planned_outcome(self)


TASK_CLASSES: dict[str, list[type[Task]]] = {"Job": [Job], "Soak": [SoakJob, SoakChild]}


async def patiently(action: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``action``, retrying while the server is unreachable (a restart, say)."""
    deadline = time.monotonic() + TRANSITION_PATIENCE
    delay = 0.05
    while True:
        try:
            return await action()
        except ConnectionFailure:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def record(task: Task, event: str, consumer: str) -> None:
    executions = task.collection().database[EXECUTIONS]
    entry = {"task": task.id, "event": event, "attempt": task.attempts, "token": task.lease_token, "consumer": consumer}
    await patiently(lambda: executions.insert_one(dict(entry)))


async def planned_outcome(task: Job | SoakJob | SoakChild) -> Any:
    """Raise on the planned failing attempts (recorded first), else return the result."""
    if task.attempts <= task.fail_times:
        await record(task, "failed", task.consumer_id or "?")
        raise PlannedFailure(f"planned failure on attempt {task.attempts}")
    return {"n": task.n, "token": task.lease_token}


async def handle(task: Any, consumer: str) -> str:
    """Run one task claimed through ``queue()`` and settle it the way a worker would."""
    token = task.lease_token
    try:
        try:
            result = await task.run()
        except PlannedFailure as exc:
            failure = exc
            await patiently(lambda: task.fail(failure))
            return "failed"
        await patiently(lambda: task.finish(result))
        await record(task, "finished", consumer)
        return "finished"
    except LeaseLost:
        task.lease_token = token
        await record(task, "lease_lost", consumer)
        return "lease_lost"
