"""Retry filters per class (``retry_on`` / ``dont_retry_on``) and ``last_error``, through a real Worker."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from beanie import Link

from beanie_tasks import Backoff, DependencyType, State, Task, Worker, depends_on
from beanie_tasks.task import utcnow
from beanie_tasks.testing import eventually, running

FAST_RETRY = Backoff(base=0.05, factor=1.0, maximum=0.05, jitter=0.0)


class Fetch(Task):
    """Retries network trouble only; raises what ``kind`` names."""

    kind: str
    fail_times: int = 99

    class TaskSettings:
        max_attempts = 3
        backoff = FAST_RETRY
        retry_on = (TimeoutError, ConnectionError)

    async def run(self) -> str:
        if self.attempts <= self.fail_times:
            raise {"timeout": TimeoutError, "value": ValueError, "refused": ConnectionRefusedError}[self.kind](
                f"{self.kind} {self.attempts}"
            )
        return "fetched"


class SyncFetch(Task):
    """The same filters on a plain ``def run()`` (a worker thread)."""

    kind: str

    class TaskSettings:
        max_attempts = 3
        backoff = FAST_RETRY
        retry_on = TimeoutError  # one class is accepted as well as a tuple

    def run(self) -> None:
        raise TimeoutError("slow upstream") if self.kind == "timeout" else KeyError(self.kind)


class Picky(Task):
    """``dont_retry_on`` wins over a broad ``retry_on``."""

    key: str

    class TaskSettings:
        max_attempts = 3
        backoff = FAST_RETRY
        retry_on = (Exception,)
        dont_retry_on = (KeyError,)

    async def run(self) -> None:
        raise KeyError(self.key) if self.key == "missing" else RuntimeError(self.key)


class Hang(Task):
    """The worker's own timeout counts as a TimeoutError for the filters."""

    class TaskSettings:
        max_attempts = 2
        backoff = FAST_RETRY
        timeout = 0.2
        retry_on = (ValueError,)

    async def run(self) -> None:
        import asyncio

        await asyncio.sleep(30)


class Publish(Task):
    fetch: Link[Fetch] = depends_on(DependencyType.DIRECT)

    async def run(self) -> None:
        return None


MODELS = (Fetch, SyncFetch, Picky, Hang, Publish)

PROCESS_MODULE = "bt_retry_filter_children"
PROCESS_SOURCE = textwrap.dedent(
    """
    from beanie_tasks import Backoff, Task


    class ChildFetch(Task):
        kind: str

        def run(self) -> None:
            raise TimeoutError("slow upstream") if self.kind == "timeout" else ValueError("bad payload")

        class Settings:
            name = "retry_filter_children"

        class TaskSettings:
            executor = "process"
            max_attempts = 3
            backoff = Backoff(base=0.05, factor=1.0, maximum=0.05, jitter=0.0)
            retry_on = (TimeoutError,)
    """
)


@pytest.fixture(autouse=True)
async def models(init_tasks: Callable[..., Awaitable[None]]) -> None:
    await init_tasks(*MODELS)


async def ended(task_class: type[Task], task_id: Any) -> Task | None:
    stored = await task_class.get(task_id)
    return stored if stored is not None and stored.state.is_terminal else None


def worker(*classes: type[Task]) -> Worker:
    return Worker(list(classes), concurrency=4, use_change_stream=False, schedules=False)


# ------------------------------------------------------------ through a worker


async def test_an_exception_outside_retry_on_fails_at_once() -> None:
    bad = await Fetch(kind="value").push()
    async with running(worker(Fetch)):
        stored = await eventually(lambda: ended(Fetch, bad.id))
    assert stored.state is State.FAILED and stored.attempts == 1, "one attempt, no retry"
    assert stored.error == "ValueError: value 1" and stored.last_error is None


async def test_an_exception_in_retry_on_is_retried_and_a_subclass_counts() -> None:
    flaky = await Fetch(kind="refused", fail_times=1).push()  # ConnectionRefusedError is a ConnectionError
    exhausted = await Fetch(kind="timeout").push()
    async with running(worker(Fetch)):
        recovered = await eventually(lambda: ended(Fetch, flaky.id))
        failed = await eventually(lambda: ended(Fetch, exhausted.id))
    assert recovered.state is State.FINISHED and recovered.attempts == 2 and recovered.result == "fetched"
    assert recovered.error is None, "a task that succeeded has no error"
    assert recovered.last_error == "ConnectionRefusedError: refused 1", "the retried attempt's error is kept"
    assert failed.state is State.FAILED and failed.attempts == 3
    assert failed.error == "TimeoutError: timeout 3" and failed.last_error == "TimeoutError: timeout 2"


async def test_sync_thread_handlers_follow_the_filters() -> None:
    retried = await SyncFetch(kind="timeout").push()
    final = await SyncFetch(kind="other").push()
    async with running(worker(SyncFetch)):
        exhausted = await eventually(lambda: ended(SyncFetch, retried.id))
        at_once = await eventually(lambda: ended(SyncFetch, final.id))
    assert exhausted.state is State.FAILED and exhausted.attempts == 3
    assert at_once.state is State.FAILED and at_once.attempts == 1 and at_once.error == "KeyError: 'other'"


async def test_dont_retry_on_wins_over_retry_on() -> None:
    missing = await Picky(key="missing").push()
    broken = await Picky(key="broken").push()
    async with running(worker(Picky)):
        at_once = await eventually(lambda: ended(Picky, missing.id))
        retried = await eventually(lambda: ended(Picky, broken.id))
    assert at_once.state is State.FAILED and at_once.attempts == 1
    assert retried.state is State.FAILED and retried.attempts == 3


async def test_a_worker_timeout_counts_as_timeout_error() -> None:
    task = await Hang().push()
    async with running(worker(Hang)):
        stored = await eventually(lambda: ended(Hang, task.id))
    assert stored.state is State.FAILED and stored.attempts == 1, "retry_on has no TimeoutError: no retry"
    assert stored.error == "timed out after 0.2 s"


async def test_a_dependent_of_a_task_failed_by_the_filter_fails_too() -> None:
    fetch = await Fetch(kind="value").push()
    publish = await Publish(fetch=fetch).push()
    async with running(worker(Fetch, Publish)):
        await eventually(lambda: ended(Fetch, fetch.id))
        stored = await eventually(lambda: ended(Publish, publish.id))
    assert stored.state is State.FAILED and stored.error is not None and "ValueError: value 1" in stored.error


async def test_the_context_manager_follows_the_filters() -> None:
    await Fetch(kind="value").push()
    task = await Fetch.pop()
    assert task is not None
    with pytest.raises(ValueError):
        async with task:
            raise ValueError("bad payload")
    stored = await Fetch.get(task.id)
    assert stored is not None and stored.state is State.FAILED and stored.attempts == 1


async def test_process_executor_handlers_follow_the_filters(
    init_tasks: Callable[..., Awaitable[None]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / f"{PROCESS_MODULE}.py").write_text(PROCESS_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, PROCESS_MODULE, raising=False)
    child: Any = importlib.import_module(PROCESS_MODULE).ChildFetch
    await init_tasks(*MODELS, child)
    retried = await child(kind="timeout").push()
    final = await child(kind="value").push()
    async with running(worker(child)):
        exhausted = await eventually(lambda: ended(child, retried.id), timeout=60)
        at_once = await eventually(lambda: ended(child, final.id), timeout=60)
    assert exhausted.state is State.FAILED and exhausted.attempts == 3
    assert at_once.state is State.FAILED and at_once.attempts == 1 and at_once.error == "ValueError: bad payload"


async def test_a_redelivered_task_that_finishes_has_no_error() -> None:
    """A lost lease is noted in last_error, not error: the task did not fail."""
    await Fetch(kind="value").push()
    task = await Fetch.pop()
    assert task is not None
    await Fetch.collection().update_one(
        {"_id": task.id}, {"$set": {"lease_expires_at": utcnow() - timedelta(minutes=5)}}
    )
    assert await Fetch.recover_expired() == 1
    again = await Fetch.pop()
    assert again is not None and again.id == task.id and again.error is None
    assert again.last_error is not None and "lease expired" in again.last_error
    await again.finish("done")
    stored = await Fetch.get(task.id)
    assert stored is not None and stored.state is State.FINISHED and stored.error is None
    assert stored.last_error == again.last_error
