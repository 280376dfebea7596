"""Beanie's own whole-document writes cannot get around the queue's guarded transitions.

``save()``, ``replace()`` and ``save_changes()`` on a pushed task raise ``TransitionError``
and write nothing: a stale copy can never overwrite a newer state (a finished task made
RUNNING again, its result lost), and never brings back a second in-flight task with the
same ``dedupe_key``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from beanie_tasks import State, Task, TransitionError


class Note(Task):
    text: str = ""


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Note)


async def raw(task: Task) -> dict[str, Any]:
    document = await Note.collection().find_one({"_id": task.id})
    assert document is not None
    return dict(document)


async def attempt(write: Callable[[], Awaitable[Any]]) -> BaseException | None:
    try:
        await write()
    except Exception as exc:
        return exc
    return None


def refused(error: BaseException | None, method: str) -> None:
    assert isinstance(error, TransitionError), f"{method}() was not refused with TransitionError: {error!r}"
    assert re.search(r"push|finish|fail|release|cancel", str(error)), str(error)


@pytest.mark.parametrize("method", ["save", "replace", "save_changes"])
async def test_whole_document_writes_are_refused_and_change_nothing(method: str) -> None:
    """On a pushed task, save()/replace()/save_changes() raise TransitionError and the stored document is unchanged."""
    task = await Note(text="original").push()
    before = await raw(task)
    task.text = "edited"
    task.priority = 9
    task.state = State.FINISHED
    error = await attempt(getattr(task, method))
    assert await raw(task) == before, f"{method}() changed the stored task"
    refused(error, method)


async def test_a_stale_copy_cannot_overwrite_a_finished_task() -> None:
    """Pop a task, keep that copy, finish it through another copy: stale.save() raises, the task stays FINISHED."""
    await Note(text="job").push()
    stale = await Note.pop()
    assert stale is not None
    other = await Note.get(stale.id)
    assert other is not None
    await other.finish({"answer": 42})
    error = await attempt(stale.save)
    stored = await raw(stale)
    assert stored["state"] == State.FINISHED.value, f"a stale save() made the finished task {stored['state']}"
    assert stored["result"] == {"answer": 42}
    refused(error, "save")


async def test_replace_cannot_put_a_second_task_with_the_same_dedupe_key_in_flight() -> None:
    """A stale copy of an ended task replaced over it would be in flight beside the newer task with its
    dedupe_key; replace() raises instead and exactly one task with that key stays in flight."""
    first = await Note(text="first", dedupe_key="k").push()
    stale = await Note.get(first.id)
    assert stale is not None
    claimed = await Note.pop()
    assert claimed is not None and claimed.id == first.id
    await claimed.finish()
    second = await Note(text="second", dedupe_key="k").push()
    assert second.id != first.id
    error = await attempt(stale.replace)
    in_flight = await Note.collection().count_documents(
        {"dedupe_key": "k", "state": {"$in": [State.CREATED.value, State.RUNNING.value]}}
    )
    assert in_flight == 1, f"{in_flight} tasks with dedupe_key 'k' are in flight"
    assert (await raw(first))["state"] == State.FINISHED.value
    refused(error, "replace")
