"""``run_now``: one task through the worker's own path, on every backend.

Calling ``run()`` by hand has no lease, so progress fails; ``run_now`` claims the task
first and then behaves as a worker does: heartbeats, timeout, result, retry policy,
dependents released.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import pytest
from beanie import Link

from beanie_tasks import Backoff, DependencyType, State, Task, TransitionError, Worker, depends_on
from beanie_tasks.testing import run_now

DEADLINE = 20.0  # generous: a loaded 2-core machine is slow, never this slow


class Report(Task):
    pages: int

    async def run(self) -> dict[str, int]:
        for page in range(1, self.pages + 1):
            await self.set_progress(page / self.pages, f"page {page}")
        return {"pages": self.pages}


class Heartbeaten(Task):
    """Returns once a heartbeat has extended its lease, which only the worker's keep-alive does."""

    class TaskSettings:
        visibility_timeout = 0.6  # a heartbeat every 0.2 s

    async def run(self) -> bool:
        first = await self.lease_expiry()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while loop.time() < deadline:
            await asyncio.sleep(0.05)
            if await self.lease_expiry() > first:
                return True
        return False

    async def lease_expiry(self) -> object:
        stored = await Heartbeaten.get(self.id)
        assert stored is not None and stored.lease_expires_at is not None
        return stored.lease_expires_at


class Flaky(Task):
    class TaskSettings:
        max_attempts = 2
        backoff = Backoff(base=0, jitter=0)

    async def run(self) -> None:
        raise RuntimeError(f"attempt {self.attempts} failed")


class TooSlow(Task):
    class TaskSettings:
        timeout = 0.2

    async def run(self) -> None:
        await asyncio.sleep(DEADLINE)


class SyncStamp(Task):
    def run(self) -> str:
        return threading.current_thread().name


class Parent(Task):
    async def run(self) -> str:
        return "parent done"


class Child(Task):
    parent: Link[Parent] = depends_on(DependencyType.DIRECT)

    async def run(self) -> str:
        return "child done"


@pytest.fixture(autouse=True)
async def models(init_tasks: Callable[..., Awaitable[None]]) -> None:
    await init_tasks(Report, Heartbeaten, Flaky, TooSlow, SyncStamp, Parent, Child)


async def test_calling_run_by_hand_has_no_lease_but_run_now_does() -> None:
    report = await Report(pages=2).push()
    with pytest.raises(TransitionError, match="not leased by this consumer"):
        await report.run()
    done = await run_now(report)
    assert done.state is State.FINISHED and done.result == {"pages": 2} and done.attempts == 1
    stored = await Report.get(report.id)
    assert stored is not None and stored.state is State.FINISHED and stored.progress == 1.0
    assert stored.progress_message == "page 2"


async def test_heartbeats_extend_the_lease_while_run_works() -> None:
    done = await run_now(await Heartbeaten().push())
    assert done.state is State.FINISHED and done.result is True


async def test_a_failure_follows_the_retry_policy() -> None:
    task = await Flaky().push()
    first = await run_now(task)
    assert (
        first.state is State.CREATED
        and first.attempts == 1
        and first.error is None
        and first.last_error == "RuntimeError: attempt 1 failed"
    )
    second = await run_now(task)
    assert second.state is State.FAILED and second.attempts == 2 and second.error == "RuntimeError: attempt 2 failed"


async def test_the_class_timeout_applies() -> None:
    done = await run_now(await TooSlow().push())
    assert done.state is State.FAILED and done.error == "timed out after 0.2 s"


async def test_a_sync_handler_runs_in_a_worker_thread() -> None:
    done = await run_now(await SyncStamp().push())
    assert done.state is State.FINISHED and str(done.result).startswith("beanie-tasks")


async def test_finishing_a_dependency_releases_its_dependent() -> None:
    parent = await Parent().push()
    child = await Child(parent=parent).push()  # type: ignore[arg-type]
    with pytest.raises(TransitionError, match="waiting for its dependencies"):
        await run_now(child)
    await run_now(parent)
    done = await run_now(child)
    assert done.state is State.FINISHED and done.result == "child done"


async def test_a_task_that_cannot_run_now_says_why() -> None:
    with pytest.raises(TypeError, match="run_now takes a pushed task"):
        await run_now(Report)  # type: ignore[type-var]
    with pytest.raises(TransitionError, match="never pushed"):
        await run_now(Report(pages=1))
    later = await Report(pages=1).push(delay=3600)
    with pytest.raises(TransitionError, match=r"cannot run Report .* now: it is scheduled for 20"):
        await run_now(later)
    claimed = await Report(pages=1).push()
    assert await Report.pop() is not None
    with pytest.raises(TransitionError, match="it is RUNNING, not CREATED"):
        await run_now(claimed)
    assert await later.cancel()
    with pytest.raises(TransitionError, match="it is CANCELLED, not CREATED"):
        await run_now(later)


async def test_a_given_worker_runs_it_and_counts_it() -> None:
    worker = Worker([Report], consumer_id="test-consumer")
    done = await run_now(await Report(pages=1).push(), worker=worker)
    assert done.state is State.FINISHED and done.consumer_id == "test-consumer"
    assert worker.stats["started"] == 1 and worker.stats["finished"] == 1


async def test_a_malformed_document_is_set_aside_not_left_running() -> None:
    report = await Report(pages=1).push()
    await Report.collection().update_one({"_id": report.id}, {"$set": {"pages": "many"}})  # a hostile writer
    with pytest.raises(TransitionError, match="malformed Report document: 1 validation error"):
        await run_now(report)
    stored = await Report.collection().find_one({"_id": report.id})
    assert stored["state"] == "FAILED" and "pages" in stored["error"]
