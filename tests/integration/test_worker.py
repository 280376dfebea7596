"""The worker in-process: handlers, results, retries, timeouts, cancellation, fairness, drain."""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import timedelta
from typing import Any, ClassVar

import pytest

from beanie_tasks import Backoff, State, Task, Worker
from beanie_tasks.task import utcnow
from beanie_tasks.testing import eventually, running

FAST_RETRY = Backoff(base=0.05, factor=2.0, maximum=0.2, jitter=0.0)


class Journal:
    """What handlers did, shared with the test (reset before each test)."""

    events: ClassVar[list[str]] = []
    gate: ClassVar[asyncio.Event | None] = None
    running: ClassVar[int] = 0
    most_running: ClassVar[int] = 0

    @classmethod
    def reset(cls) -> None:
        cls.events = []
        cls.gate = asyncio.Event()
        cls.running = cls.most_running = 0


class Add(Task):
    a: int
    b: int

    async def run(self) -> int:
        return self.a + self.b


class SyncHash(Task):
    text: str

    def run(self) -> dict[str, Any]:
        import hashlib

        return {"sha1": hashlib.sha1(self.text.encode()).hexdigest(), "thread": threading.current_thread().name}


class Flaky(Task):
    fail_times: int

    class TaskSettings:
        max_attempts = 3
        backoff = FAST_RETRY

    async def run(self) -> str:
        Journal.events.append(f"attempt {self.attempts}")
        if self.attempts <= self.fail_times:
            raise RuntimeError(f"boom {self.attempts}")
        return "ok"


class Slow(Task):
    class TaskSettings:
        timeout = 0.3
        max_attempts = 2
        backoff = Backoff(base=0.05, jitter=0.0)

    async def run(self) -> None:
        Journal.events.append("started")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            Journal.events.append("cancelled")
            raise


class Blocker(Task):
    """Waits for the test's gate; reports progress; counts how many run at once."""

    label: str = ""

    class TaskSettings:
        visibility_timeout = 2.0
        heartbeat_interval = 0.2

    async def run(self) -> str:
        Journal.running += 1
        Journal.most_running = max(Journal.most_running, Journal.running)
        Journal.events.append(f"start {self.label}")
        try:
            await self.set_progress(0.5, "waiting for the gate")
            assert Journal.gate is not None
            await Journal.gate.wait()
        except asyncio.CancelledError:
            Journal.events.append(f"cancelled {self.label}")
            raise
        finally:
            Journal.running -= 1
        return self.label


class Capped(Blocker):
    class TaskSettings:
        concurrency = 1


class Alpha(Task):
    async def run(self) -> None:
        Journal.events.append("A")
        await asyncio.sleep(0.01)


class Beta(Task):
    async def run(self) -> None:
        Journal.events.append("B")
        await asyncio.sleep(0.01)


class Stolen(Task):
    """Its lease is taken away while it runs, as if it had expired and been re-claimed."""

    class TaskSettings:
        visibility_timeout = 2.0
        heartbeat_interval = 0.2

    async def run(self) -> None:
        await type(self).collection().update_one({"_id": self.id}, {"$set": {"lease_token": "someone-else"}})
        await asyncio.sleep(30)


class NoHandler(Task):
    pass


class Sleepy(Task):
    """Polls rarely: only a change stream can start it soon after a push."""

    class TaskSettings:
        poll_interval = 5.0
        recovery_interval = 30.0

    async def run(self) -> None:
        return None


MODELS = [Add, SyncHash, Flaky, Slow, Blocker, Capped, Alpha, Beta, Stolen, NoHandler, Sleepy]


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    Journal.reset()
    await init_tasks(*MODELS)


async def ended(task_class: type[Task], task_id: Any) -> Task | None:
    stored = await task_class.get(task_id)
    return stored if stored is not None and stored.state.is_terminal else None


async def test_async_and_sync_handlers_store_their_results() -> None:
    added = await Add(a=2, b=3).push()
    hashed = await SyncHash(text="abc").push()
    async with running(Worker([Add, SyncHash], concurrency=2)):
        done_add = await eventually(lambda: ended(Add, added.id))
        done_hash = await eventually(lambda: ended(SyncHash, hashed.id))
    assert done_add.state is State.FINISHED and done_add.result == 5
    assert done_hash.state is State.FINISHED
    assert done_hash.result["sha1"] == "a9993e364706816aba3e25717850c26c9cd0d89d"
    assert done_hash.result["thread"] != threading.current_thread().name  # a plain def runs in a thread


async def test_exceptions_follow_the_retry_policy() -> None:
    recovers = await Flaky(fail_times=2).push()
    gives_up = await Flaky(fail_times=5).push()
    async with running(Worker([Flaky], concurrency=2)):
        good = await eventually(lambda: ended(Flaky, recovers.id))
        bad = await eventually(lambda: ended(Flaky, gives_up.id))
    assert good.state is State.FINISHED and good.attempts == 3 and good.result == "ok"
    assert bad.state is State.FAILED and bad.attempts == 3 and bad.error == "RuntimeError: boom 3"


async def test_timeout_cancels_run_and_counts_as_a_failed_attempt() -> None:
    task = await Slow().push()
    async with running(Worker([Slow])):
        stored = await eventually(lambda: ended(Slow, task.id))
    assert stored.state is State.FAILED and stored.attempts == 2
    assert stored.error == "timed out after 0.3 s"
    assert Journal.events.count("cancelled") == 2


async def test_cancel_of_a_running_task_stops_run_within_a_heartbeat() -> None:
    task = await Blocker(label="x").push()
    async with running(Worker([Blocker])) as worker:
        await eventually(lambda: _running_state(task.id))
        assert await task.cancel() is True
        await eventually(lambda: _async("cancelled x" in Journal.events), timeout=5)
        await eventually(lambda: _async(worker.running == 0))
    stored = await Blocker.get(task.id)
    assert stored is not None and stored.state is State.CANCELLED and stored.result is None


async def test_progress_is_visible_while_running_and_leases_are_extended() -> None:
    task = await Blocker(label="p").push()
    async with running(Worker([Blocker])):
        first = await eventually(lambda: _running_state(task.id))
        assert first.progress == 0.5 and first.progress_message == "waiting for the gate"

        async def extended() -> bool:
            now = await Blocker.get(task.id)
            assert now is not None and first.lease_expires_at is not None
            return now.lease_expires_at is not None and now.lease_expires_at > first.lease_expires_at

        await eventually(extended)
        assert Journal.gate is not None
        Journal.gate.set()
        stored = await eventually(lambda: ended(Blocker, task.id))
    assert stored.state is State.FINISHED and stored.result == "p" and stored.attempts == 1


async def test_concurrency_is_bounded_per_worker_and_per_class() -> None:
    for i in range(5):
        await Blocker(label=f"b{i}").push()
    for i in range(3):
        await Capped(label=f"c{i}").push()
    async with running(Worker([Blocker, Capped], concurrency=3)) as worker:
        await eventually(lambda: _async(Journal.running == 3))
        await asyncio.sleep(0.3)  # give an over-eager worker the chance to start a fourth
        assert Journal.most_running == 3 and worker.running == 3
        assert sum(e.startswith("start c") for e in Journal.events) == 1  # Capped: concurrency = 1
        assert Journal.gate is not None
        Journal.gate.set()
        await eventually(lambda: _all_finished(Blocker, 5))
        await eventually(lambda: _all_finished(Capped, 3))
    assert Journal.most_running == 3


async def test_claims_are_fair_across_classes() -> None:
    for _ in range(4):
        await Alpha().push()
    for _ in range(4):
        await Beta().push()
    async with running(Worker([Alpha, Beta], concurrency=1)):
        await eventually(lambda: _async(len(Journal.events) == 8))
    assert Journal.events == ["A", "B"] * 4


async def test_stop_drains_and_releases_what_outlives_the_grace_period() -> None:
    task = await Blocker(label="long").push()
    worker = Worker([Blocker], grace_period=0.3)
    async with running(worker):
        await eventually(lambda: _running_state(task.id))
    stored = await Blocker.get(task.id)
    assert stored is not None and stored.state is State.CREATED and stored.attempts == 0
    assert stored.lease_token is None and "cancelled long" in Journal.events
    assert worker.stats["released"] == 1


async def test_stop_lets_short_tasks_finish_within_the_grace_period() -> None:
    task = await Blocker(label="short").push()
    stop = asyncio.Event()
    worker = Worker([Blocker], grace_period=10)
    job = asyncio.create_task(worker.run(stop))
    await eventually(lambda: _running_state(task.id))
    stop.set()
    await asyncio.sleep(0.2)
    assert not job.done()  # still draining, not claiming
    assert Journal.gate is not None
    Journal.gate.set()
    await asyncio.wait_for(job, 10)
    stored = await Blocker.get(task.id)
    assert stored is not None and stored.state is State.FINISHED


async def test_lost_lease_is_logged_and_the_worker_keeps_going(caplog: pytest.LogCaptureFixture) -> None:
    stolen = await Stolen().push()
    async with running(Worker([Stolen, Add])):
        await eventually(
            lambda: _async(any("lease" in r.getMessage() and "lost" in r.getMessage() for r in caplog.records))
        )
        after = await Add(a=1, b=1).push()
        done = await eventually(lambda: ended(Add, after.id))
    assert done.result == 2
    stored = await Stolen.get(stolen.id)
    assert stored is not None and stored.state is State.RUNNING and stored.lease_token == "someone-else"
    assert any(r.levelno >= logging.ERROR and str(stolen.id) in r.getMessage() for r in caplog.records)


async def test_bad_worker_arguments_fail_early() -> None:
    with pytest.raises(TypeError, match="NoHandler has no run"):
        Worker([NoHandler])
    with pytest.raises(ValueError, match="at least one"):
        Worker([])
    with pytest.raises(TypeError, match="Task subclasses"):
        Worker([dict])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="concurrency"):
        Worker([Add], concurrency=0)
    with pytest.raises(NotImplementedError, match="no run"):
        NoHandler().run()


async def test_recovery_runs_in_the_worker() -> None:
    task = await Flaky(fail_times=0).push()
    claimed = await Flaky.pop(consumer_id="dead-worker")
    assert claimed is not None
    await Flaky.collection().update_one(
        {"_id": task.id}, {"$set": {"lease_expires_at": utcnow() - timedelta(seconds=1)}}
    )
    async with running(Worker([Flaky])):
        stored = await eventually(lambda: ended(Flaky, task.id))
    assert stored.state is State.FINISHED and stored.result == "ok"
    assert stored.attempts == 1 and stored.redeliveries == 1  # the lost lease cost a delivery, not an attempt


@pytest.mark.wire
async def test_an_idle_worker_is_woken_by_a_change_stream() -> None:
    async with running(Worker([Sleepy])):
        for _ in range(3):
            await asyncio.sleep(1.2)  # idle long enough for polling to have backed off
            task = await Sleepy().push()
            done = await eventually(lambda task=task: ended(Sleepy, task.id))
            latency = (done.started_at - task.created_at).total_seconds()
            assert latency < 0.5, f"started {latency:.3f} s after the push; polling alone would wait up to 5 s"


async def _running_state(task_id: Any) -> Blocker | None:
    stored = await Blocker.get(task_id)
    return stored if stored is not None and stored.state is State.RUNNING and stored.progress is not None else None


async def _all_finished(task_class: type[Task], count: int) -> bool:
    return bool(await task_class.find(task_class.state == State.FINISHED).count() == count)


async def _async(value: Any) -> Any:
    if asyncio.iscoroutine(value):
        return await value
    return value
