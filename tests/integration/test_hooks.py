"""Worker hooks: startup and shutdown, middleware around each run (sync and async), and the push hook."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from beanie import Document

from beanie_tasks import Backoff, State, Task, Worker, hooks
from beanie_tasks.errors import HookError
from beanie_tasks.hooks import Outcome
from beanie_tasks.testing import eventually, running


class Journal:
    events: ClassVar[list[Any]] = []


class HookDouble(Task):
    n: int

    async def run(self) -> int:
        Journal.events.append(("run", self.n))
        return self.n * 2


class HookFlaky(Task):
    class TaskSettings:
        max_attempts = 2
        backoff = Backoff(base=0.05, jitter=0.0)

    def run(self) -> None:  # a sync handler: the middleware still sees its outcome
        raise ValueError(f"bad attempt {self.attempts}")


class HookSelfSettling(Task):
    """run() settles the task itself: a release the first time, a failure to retry the second."""

    class TaskSettings:
        max_attempts = 3
        backoff = Backoff(base=0.05, jitter=0.0)

    async def run(self) -> None:
        Journal.events.append(("run", self.attempts))
        if len(Journal.events) == 1:
            await self.release()
        else:
            await self.fail("not today")


class AppNote(Document):
    """An app model that the worker's task writes: a startup hook registers it."""

    text: str


class HookWritesNote(Task):
    async def run(self) -> str:
        await AppNote(text="from a task").insert()
        return "noted"


class Recorder(hooks.Middleware):
    def __init__(self, name: str) -> None:
        self.name = name

    def before_run(self, task: Task) -> None:
        Journal.events.append((self.name, "before", type(task).__name__, task.state.value))

    async def on_exception(self, task: Task, error: BaseException) -> None:
        Journal.events.append((self.name, "exception", repr(error)))

    def after_run(self, task: Task, outcome: Outcome) -> None:
        Journal.events.append((self.name, "after", outcome.status, outcome.result, task.state.value))
        assert outcome.duration >= 0 and outcome.settle_ended_ns >= outcome.settle_started_ns


class Exploding(hooks.Middleware):
    def before_run(self, task: Task) -> None:
        raise RuntimeError("middleware bug")

    def after_run(self, task: Task, outcome: Outcome) -> None:
        raise RuntimeError("middleware bug")


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    Journal.events = []
    await init_tasks(HookDouble, HookFlaky, HookWritesNote, HookSelfSettling)


async def ended(task_class: type[Task], task_id: Any) -> Task | None:
    stored = await task_class.get(task_id)
    return stored if stored is not None and stored.state.is_terminal else None


async def test_middleware_sees_each_run_and_its_outcome_in_order() -> None:
    pushed = await HookDouble(n=21).push()
    worker = Worker([HookDouble], middleware=[Recorder("outer"), Recorder("inner")])
    async with running(worker):
        await eventually(lambda: ended(HookDouble, pushed.id))
        await eventually(lambda: asyncio.sleep(0, result=len(Journal.events) >= 5))
    assert Journal.events == [
        ("outer", "before", "HookDouble", "RUNNING"),
        ("inner", "before", "HookDouble", "RUNNING"),
        ("run", 21),
        ("inner", "after", hooks.FINISHED, 42, "FINISHED"),
        ("outer", "after", hooks.FINISHED, 42, "FINISHED"),
    ]


async def test_on_exception_then_after_run_for_a_retry_and_the_final_failure() -> None:
    pushed = await HookFlaky().push()
    async with running(Worker([HookFlaky], middleware=[Recorder("m")])):
        await eventually(lambda: ended(HookFlaky, pushed.id))
        await eventually(lambda: asyncio.sleep(0, result=len(Journal.events) >= 6))
    assert Journal.events == [
        ("m", "before", "HookFlaky", "RUNNING"),
        ("m", "exception", "ValueError('bad attempt 1')"),
        ("m", "after", hooks.RETRYING, None, "CREATED"),
        ("m", "before", "HookFlaky", "RUNNING"),
        ("m", "exception", "ValueError('bad attempt 2')"),
        ("m", "after", hooks.FAILED, None, "FAILED"),
    ]


async def test_a_raising_middleware_is_logged_and_cannot_fail_a_task(caplog: pytest.LogCaptureFixture) -> None:
    pushed = await HookDouble(n=1).push()
    async with running(Worker([HookDouble], middleware=[Exploding()])):
        done = await eventually(lambda: ended(HookDouble, pushed.id))
    assert done.state is State.FINISHED and done.result == 2
    assert any("Exploding.before_run raised" in r.getMessage() for r in caplog.records)


async def test_startup_hook_registers_the_apps_models_and_shutdown_hooks_run_after_the_drain() -> None:
    pushed = await HookWritesNote().push()

    async def register_models(worker: Worker) -> AsyncIterator[None]:
        from beanie import init_beanie

        await init_beanie(database=worker.database, document_models=[AppNote])
        Journal.events.append("setup")
        yield
        Journal.events.append("teardown")

    def on_shutdown(worker: Worker) -> None:
        Journal.events.append(f"shutdown after {worker.running} running")

    async with running(Worker([HookWritesNote], on_startup=[register_models], on_shutdown=[on_shutdown])):
        done = await eventually(lambda: ended(HookWritesNote, pushed.id))
    assert done.state is State.FINISHED, done.error
    assert await AppNote.find_one(AppNote.text == "from a task") is not None
    assert Journal.events == ["setup", "shutdown after 0 running", "teardown"]


async def test_a_failing_startup_hook_stops_the_worker_before_any_claim() -> None:
    pushed = await HookDouble(n=3).push()

    def broken(worker: Worker) -> None:
        raise KeyError("OPENAI_KEY")

    with pytest.raises(HookError, match=r"startup hook .*broken failed: KeyError: 'OPENAI_KEY'"):
        await Worker([HookDouble], on_startup=[broken]).run()
    stored = await HookDouble.get(pushed.id)
    assert stored is not None and stored.state is State.CREATED and stored.attempts == 0


async def test_an_uninitialised_model_in_run_fails_with_how_to_register_it() -> None:
    pushed = await HookWritesNote().push()
    AppNote._document_settings = None  # as in a worker process that never initialised it
    async with running(Worker([HookWritesNote])):
        failed = await eventually(lambda: ended(HookWritesNote, pushed.id))
    assert failed.state is State.FAILED
    assert failed.error is not None and failed.error.startswith("ModelNotInitialized: ")
    assert "test_hooks.AppNote" in failed.error
    assert "document_models" in failed.error and "--setup module:function" in failed.error


async def test_push_middleware_sees_the_task_before_and_after_the_insert() -> None:
    seen: list[Any] = []

    class Stamp:
        def before_push(self, task: Task) -> None:
            seen.append(("before", task.id is not None, task.state.value))
            task.trace_context = {"stamped": "yes"}  # a field set here is stored by the same insert

        def after_push(self, task: Task, error: BaseException | None) -> None:
            seen.append(("after", error))

    stamp = Stamp()
    hooks.add_push_middleware(stamp)
    try:
        pushed = await HookDouble(n=5).push()
    finally:
        hooks.remove_push_middleware(stamp)
    assert seen == [("before", True, "CREATED"), ("after", None)]
    stored = await HookDouble.get(pushed.id)
    assert stored is not None and stored.trace_context == {"stamped": "yes"}
    await HookDouble(n=6).push()
    assert len(seen) == 2  # removed: not called again


async def test_sync_generator_setup_and_a_raising_shutdown_hook(caplog: pytest.LogCaptureFixture) -> None:
    def setup(worker: Worker) -> Any:
        Journal.events.append("open")
        yield
        Journal.events.append("close")

    def broken_shutdown(worker: Worker) -> None:
        raise OSError("socket already closed")

    async with running(Worker([HookDouble], on_startup=[setup], on_shutdown=[broken_shutdown])):
        await eventually(lambda: asyncio.sleep(0, result="open" in Journal.events))
    assert Journal.events == ["open", "close"]  # the other hooks still ran
    assert any("broken_shutdown raised" in r.getMessage() for r in caplog.records)


async def test_a_raising_push_middleware_is_logged_and_the_push_goes_through(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def before_push(self, task: Task) -> None:
            raise RuntimeError("audit service down")

    broken = Broken()
    hooks.add_push_middleware(broken)
    try:
        pushed = await HookDouble(n=7).push()
    finally:
        hooks.remove_push_middleware(broken)
    assert (await HookDouble.get(pushed.id)) is not None
    assert any("Broken.before_push raised" in r.getMessage() for r in caplog.records)


async def test_a_task_that_run_settles_itself_is_told_apart_release_from_retry() -> None:
    pushed = await HookSelfSettling().push()
    statuses: list[str] = []

    class Statuses(hooks.Middleware):
        def after_run(self, task: Task, outcome: Outcome) -> None:
            statuses.append(outcome.status)

    async with running(Worker([HookSelfSettling], middleware=[Statuses()])):
        await eventually(lambda: asyncio.sleep(0, result=len(statuses) >= 2))
    assert statuses[:2] == [hooks.RELEASED, hooks.RETRYING]
    assert (await HookSelfSettling.get(pushed.id)) is not None
