"""Garbage in dependency bookkeeping never stops a worker, nor a restarted one.

* a FINISHED dependency whose ``dependents_in`` is not a list of collection names;
* a parked dependent whose ``dep_links`` entry is not a document, so telling it fails on the server;
* a task deleted while a worker runs it.

Each is set aside (FAILED with its reason) or has its flag cleared, with an ERROR line in the
log, and the worker keeps running every other task; a vanished task costs one log line, not
a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import pytest
from beanie import Link
from bson import DBRef
from workerkit import background, until

from beanie_tasks import DependencyType, State, Task, Worker, depends_on
from beanie_tasks.clock import FAR_FUTURE

RESTARTS = 2


class Mid(Task):
    n: int = 0

    async def run(self) -> int:
        return self.n

    class Settings:
        name = "garbage_mids"

    class TaskSettings:
        poll_interval = 0.1
        recovery_interval = 0.3


class Top(Task):
    mids: list[Link[Mid]] = depends_on(DependencyType.ALL_OF)

    async def run(self) -> str:
        return "top"

    class Settings:
        name = "garbage_tops"

    class TaskSettings:
        poll_interval = 0.1
        recovery_interval = 0.3


class Other(Task):
    n: int = 0

    async def run(self) -> int:
        return self.n

    class Settings:
        name = "garbage_others"

    class TaskSettings:
        poll_interval = 0.1
        recovery_interval = 0.3


class Vanishing(Task):
    hold: bool = False
    entered: ClassVar[asyncio.Event | None] = None
    gate: ClassVar[asyncio.Event | None] = None

    async def run(self) -> str:
        if self.hold:
            assert Vanishing.entered is not None and Vanishing.gate is not None
            Vanishing.entered.set()
            await Vanishing.gate.wait()
        return "done"

    class Settings:
        name = "garbage_vanishing"

    class TaskSettings:
        poll_interval = 0.1
        recovery_interval = 0.3


@pytest.fixture(autouse=True)
async def models(init_tasks: Callable[..., Awaitable[None]]) -> None:
    await init_tasks(Mid, Top, Other, Vanishing)


async def stored(task_class: type[Task], task_id: Any) -> dict[str, Any]:
    document = await task_class.collection().find_one({"_id": task_id})
    assert document is not None
    return dict(document)


async def run_restarted(set_aside: Callable[[], Awaitable[bool | str]]) -> None:
    """Run a worker for Mid, Top and Other, restarted RESTARTS times; each run finishes fresh Other tasks."""
    for round_ in range(RESTARTS + 1):
        others = [await Other(n=round_ * 10 + i).push() for i in range(2)]
        worker = Worker([Mid, Top, Other], concurrency=2, use_change_stream=False, schedules=False)
        async with background(worker) as job:

            async def settled(others: list[Other] = others) -> bool | str:
                states = [(await stored(Other, t.id))["state"] for t in others]
                if not all(s == State.FINISHED.value for s in states):
                    return f"Other tasks {states}"
                return await set_aside()

            what = f"run {round_ + 1}: Other tasks to finish, garbage set aside"
            await until(settled, timeout=10, what=what, job=job)


def error_lines_naming(caplog: pytest.LogCaptureFixture, task_id: Any) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and str(task_id) in r.getMessage()]


@pytest.mark.parametrize("garbage", ["garbage", [123], [""]], ids=["a-string", "not-names", "empty-name"])
async def test_garbage_dependents_in_is_cleared_with_an_error_line(
    caplog: pytest.LogCaptureFixture, garbage: Any
) -> None:
    """A FINISHED task flagged ``dependents_pending`` with garbage ``dependents_in``: cleared or set aside, logged."""
    caplog.set_level(logging.WARNING)
    pushed = await Mid().push()
    task = await Mid.pop()
    assert task is not None
    await task.finish(1)
    await Mid.collection().update_one(
        {"_id": pushed.id}, {"$set": {"dependents_pending": True, "dependents_in": garbage}}
    )

    async def handled() -> bool | str:
        document = await stored(Mid, pushed.id)
        cleared = not document.get("dependents_pending")
        failed = document["state"] == State.FAILED.value and bool(document.get("error"))
        return cleared or failed or "still flagged"

    await run_restarted(handled)
    assert error_lines_naming(caplog, pushed.id), f"no ERROR log line names {pushed.id} and its garbage {garbage!r}"


async def test_parked_dependent_with_garbage_links_is_set_aside(caplog: pytest.LogCaptureFixture) -> None:
    """A parked dependent whose ``dep_links`` entry is a string is set aside FAILED; workers keep running, restarts too.

    Its dependency finished before telling it (``dependents_pending`` still set), so the first
    maintenance round tries to tell it, and the server refuses that update.
    """
    caplog.set_level(logging.WARNING)
    mid = await Mid().push()
    top = await Top(mids=[]).push()
    # Top waits for Mid, but its counters for the field are a string, not a document ...
    parked = {"dep_blocked": True, "run_at": FAR_FUTURE, "dep_run_at": top.run_at, "dep_links": {"mids": "garbage"}}
    parked["dep_wait"] = [{"i": mid.id, "f": ["mids"]}]
    await Top.collection().update_one(
        {"_id": top.id}, {"$set": parked | {"mids": [DBRef(Mid.collection().name, mid.id)]}}
    )
    # ... and Mid ended, and the process that ended it died before telling its dependents.
    ended = {"state": State.FINISHED.value, "result": 0, "dependents_pending": True}
    await Mid.collection().update_one({"_id": mid.id}, {"$set": ended | {"dependents_in": [Top.collection().name]}})

    async def set_aside() -> bool | str:
        document = await stored(Top, top.id)
        return (document["state"] == State.FAILED.value and bool(document.get("error"))) or document["state"]

    await run_restarted(set_aside)
    assert error_lines_naming(caplog, top.id), f"no ERROR log line names the set-aside dependent {top.id}"


async def test_a_refused_tell_does_not_hold_back_the_rest_of_its_page(caplog: pytest.LogCaptureFixture) -> None:
    """The first dependent of a page cannot be told (its counters are a string): the others are released at once.

    The garbage one is set aside with an ERROR line, and the dependency's flag is cleared by the
    repair sweep once nothing is left to tell.
    """
    caplog.set_level(logging.WARNING)
    mid = await Mid().push()
    garbage = await Top(mids=[mid]).push()  # the lowest _id: first in the page
    healthy = [await Top(mids=[mid]).push() for _ in range(2)]
    await Top.collection().update_one({"_id": garbage.id}, {"$set": {"dep_links": {"mids": "garbage"}}})
    claimed = await Mid.pop()
    assert claimed is not None
    await claimed.finish(0)
    released = [await Top.pop() for _ in healthy]
    assert {t.id for t in released if t is not None} == {t.id for t in healthy}
    document = await stored(Top, garbage.id)
    assert document["state"] == State.FAILED.value and document.get("error"), document["state"]
    assert error_lines_naming(caplog, garbage.id), f"no ERROR log line names the set-aside dependent {garbage.id}"
    # A wire server refuses the tell, so the flag stays for the sweep (mongomock applies it): either way the sweep
    # leaves nothing to tell.
    await Mid.check_dependencies()
    assert "dependents_pending" not in await stored(Mid, mid.id)


async def test_task_deleted_while_running_costs_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """A task deleted while its run() works: the worker logs one line without a traceback, and keeps running."""
    caplog.set_level(logging.INFO)
    Vanishing.entered, Vanishing.gate = asyncio.Event(), asyncio.Event()
    doomed = await Vanishing(hold=True).push()
    worker = Worker([Vanishing], concurrency=2, use_change_stream=False, schedules=False)
    async with background(worker) as job:

        async def entered() -> bool:
            assert Vanishing.entered is not None
            return Vanishing.entered.is_set()

        await until(entered, timeout=10, what="run() to start", job=job)
        await Vanishing.collection().delete_one({"_id": doomed.id})
        Vanishing.gate.set()
        later = await Vanishing().push()

        async def later_finished() -> bool:
            return (await stored(Vanishing, later.id))["state"] == State.FINISHED.value

        await until(later_finished, timeout=10, what="a later task to finish", job=job)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert not tracebacks, f"logged with a traceback: {[r.getMessage() for r in tracebacks]}"
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING and str(doomed.id) in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
