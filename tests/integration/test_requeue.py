"""``requeue_failed``: what it requeued, why it skipped the rest, and requeueing with dependents (API and CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from requeue_tasks import MODELS, Check, Digest, Notify, Render, Upload

from beanie_tasks import State, Task
from beanie_tasks.admin import DEDUPE_TAKEN, FAILED_BY_LINK
from tests.conftest import Backend

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(*MODELS)


async def stored(task: Task) -> Task:
    found = await type(task).get(task.id)
    assert found is not None
    return found


async def pop(task_class: type[Task]) -> Task:
    task = await task_class.pop()
    assert task is not None, f"expected a ready {task_class.__name__}"
    return task


async def broken_chain() -> tuple[Render, Upload, Notify]:
    """Render failed for good, so Upload failed because of it, and Notify because of Upload."""
    render = await Render(name="r").push()
    upload = await Upload(render=render).push()
    notify = await Notify(upload=upload).push()
    await (await pop(Render)).fail("gpu lost", retry=False)
    assert (await stored(notify)).state is State.FAILED
    return render, upload, notify


async def test_the_report_says_what_was_skipped_and_why() -> None:
    await broken_chain()
    clash = await Render(name="c", dedupe_key="nightly").push()
    await (await pop(Render)).fail("disk full", retry=False)
    await Render(name="c2", dedupe_key="nightly").push()  # the key is in flight again
    report = await Upload.requeue_failed_report()
    assert report.requeued == 0 and report.skipped == {FAILED_BY_LINK: 1}
    report = await Render.requeue_failed_report()
    assert report.requeued == 1 and report.dependents == 0 and report.skipped == {DEDUPE_TAKEN: 1}
    assert (await stored(clash)).state is State.FAILED


async def test_with_dependents_requeues_the_failed_graph_to_run_in_order() -> None:
    render, upload, notify = await broken_chain()
    report = await Render.requeue_failed_report(with_dependents=True)
    assert (report.requeued, report.dependents, report.skipped) == (1, 2, {})
    for task in (upload, notify):
        again = await stored(task)
        assert again.state is State.CREATED and again.attempts == 0 and again.error is None
        assert again.last_error is not None and "gpu lost" in again.last_error, "the failure is kept"
    assert await Upload.pop() is None and await Notify.pop() is None, "they wait for their links again"
    rendered = await pop(Render)
    assert rendered.id == render.id and rendered.last_error == "gpu lost"
    await rendered.finish()
    uploading = await pop(Upload)
    assert uploading.id == upload.id and await Notify.pop() is None
    await uploading.finish()
    assert (await pop(Notify)).id == notify.id


async def test_without_with_dependents_the_dependents_stay_failed() -> None:
    _, upload, _ = await broken_chain()
    assert await Render.requeue_failed() == 1
    assert (await stored(upload)).state is State.FAILED


async def test_a_dependent_with_another_failed_link_stays_failed_with_the_reason() -> None:
    render = await Render(name="d").push()
    check = await Check(name="d").push()
    digest = await Digest(renders=[render], check=check).push()
    await (await pop(Render)).fail("gpu lost", retry=False)  # the cause Digest keeps
    await (await pop(Check)).fail("lint", retry=False)
    report = await Render.requeue_failed_report(with_dependents=True)
    assert report.requeued == 1 and report.dependents == 0
    ((reason, count),) = report.skipped.items()
    assert count == 1 and reason.startswith("a dependency is still failed") and "lint" in reason
    assert (await stored(digest)).state is State.FAILED


async def test_a_dependent_whose_dedupe_key_is_taken_stays_failed() -> None:
    render = await Render(name="k").push()
    upload = await Upload(render=render, dedupe_key="upload-k").push()
    await (await pop(Render)).fail("gpu lost", retry=False)
    assert (await stored(upload)).state is State.FAILED
    other = await Render(name="k2").push()
    await Upload(render=other, dedupe_key="upload-k").push()
    report = await Render.requeue_failed_report(with_dependents=True)
    assert report.dependents == 0 and report.skipped == {"its dedupe_key 'upload-k' is taken by a live task": 1}


async def test_hostile_bookkeeping_on_a_failed_dependent_is_skipped_not_fatal() -> None:
    render, upload, _ = await broken_chain()
    await Upload.collection().update_one({"_id": upload.id}, {"$set": {"dep_links.render.kind": "SIDEWAYS"}})
    await Upload.collection().insert_one(
        {"state": "FAILED", "dep_failed": True, "dep_links": {"x": "not a document"}, "dependents_in": 7}
    )
    report = await Render.requeue_failed_report(with_dependents=True)
    assert report.requeued == 1 and report.dependents == 0
    ((reason, count),) = report.skipped.items()
    assert count == 1 and "bookkeeping is malformed" in reason
    assert (await stored(render)).state is State.CREATED


# ---------------------------------------------------------------- the CLI


def cli(backend: Backend, database: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m beanie_tasks.cli ...`` as a shell user runs it, with the test's classes importable."""
    assert backend.uri is not None
    path = os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = os.environ | {
        "PYTHONPATH": path,
        "MONGODB_URI": backend.uri,
        "MONGODB_DATABASE": database,
        "BEANIE_TASKS_MODULES": "requeue_tasks",
        "COLUMNS": "80",
    }
    return subprocess.run(
        [sys.executable, "-m", "beanie_tasks.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


@pytest.mark.wire
async def test_cli_requeue_failed_reports_and_takes_dependents(backend: Backend, db: Any) -> None:
    _, upload, notify = await broken_chain()
    done = cli(backend, db.name, "requeue-failed", "Upload")
    assert done.returncode == 0, done.stderr
    assert "requeued 0 FAILED Upload task(s)" in done.stdout
    assert "skipped 1 FAILED task(s):" in done.stdout and f"1 {FAILED_BY_LINK}" in done.stdout

    done = cli(backend, db.name, "requeue-failed", "Render", "--with-dependents")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == [
        "requeued 1 FAILED Render task(s)",
        "requeued 2 dependent task(s) with them, waiting for their links",
    ], done.stdout
    assert "skipped" not in done.stdout
    assert (await stored(upload)).state is State.CREATED and (await stored(notify)).state is State.CREATED
    assert await Upload.pop() is None, "it waits for Render again"
