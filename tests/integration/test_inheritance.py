"""Several task classes sharing one collection through Beanie inheritance.

Every class-level operation (claiming, counting, admin, sweeps, batches, dedupe) sees only
documents of its own class (and its subclasses); a document of a sibling class is never
returned, modified or set aside, whichever process imports which classes.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from beanie_tasks import State, Task, Worker, claim_batch
from beanie_tasks.task import utcnow
from beanie_tasks.testing import eventually, running
from tests.conftest import Backend, stop_subprocess

COLLECTION = "bt_inheritance_jobs"


class Job(Task):
    class Settings:
        is_root = True
        name = COLLECTION


class Email(Job):
    to: str = "someone"

    async def run(self) -> str:
        return f"mailed {self.to}"


class Resize(Job):
    src: str = "a.png"

    async def run(self) -> str:
        return f"resized {self.src}"


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Job, Email, Resize)


async def raw(task_id: Any) -> dict[str, Any]:
    document = await Job.collection().find_one({"_id": task_id})
    assert document is not None, f"document {task_id} vanished"
    return dict(document)


def untouched(document: dict[str, Any]) -> None:
    """A CREATED task nobody claimed, failed or set aside."""
    assert document["state"] == State.CREATED.value, document
    assert document.get("attempts") == 0, document
    assert document.get("error") is None, document
    assert document.get("lease_token") is None, document


async def test_pop_never_takes_or_touches_a_sibling_class() -> None:
    """Email.pop() claims only Email documents; a Resize ahead of it in claim order stays CREATED, untouched."""
    resize = await Resize(src="first.png").push()
    email = await Email(to="bob").push()
    popped = await Email.pop()
    assert popped is not None and popped.id == email.id
    assert await Email.pop() is None
    untouched(await raw(resize.id))
    mine = await Resize.pop()
    assert mine is not None and mine.id == resize.id


async def test_counts_only_count_the_class() -> None:
    """Email.counts() counts Email documents only, not the Resize documents in the same collection."""
    for _ in range(2):
        await Email().push()
    await Resize().push()
    assert (await Email.counts())[State.CREATED] == 2
    assert (await Resize.counts())[State.CREATED] == 1


async def test_purge_only_deletes_the_class() -> None:
    """Email.purge([FINISHED]) deletes finished Email tasks and leaves a finished Resize in place."""
    email = await Email().push()
    resize = await Resize().push()
    await email.finish()
    await resize.finish()
    assert await Email.purge([State.FINISHED]) == 1
    assert await Job.collection().find_one({"_id": email.id}) is None
    assert (await raw(resize.id))["state"] == State.FINISHED.value


async def test_requeue_failed_only_requeues_the_class() -> None:
    """Email.requeue_failed() gives fresh attempts to failed Email tasks only; a failed Resize stays FAILED."""
    email = await Email().push()
    resize = await Resize().push()
    await email.fail("broken", retry=False)
    await resize.fail("broken", retry=False)
    assert await Email.requeue_failed() == 1
    assert (await raw(email.id))["state"] == State.CREATED.value
    assert (await raw(resize.id))["state"] == State.FAILED.value


async def test_recover_expired_only_recovers_the_class() -> None:
    """Email.recover_expired() re-queues expired Email leases only; an expired Resize lease is left RUNNING."""
    await Email(max_attempts=3).push()  # attempts left: a recovered lease goes back to CREATED
    await Resize(max_attempts=3).push()
    email, resize = await Email.pop(), await Resize.pop()
    assert email is not None and resize is not None
    past = utcnow() - timedelta(minutes=5)
    await Job.collection().update_many({}, {"$set": {"lease_expires_at": past}})
    assert await Email.recover_expired() == 1
    assert (await raw(email.id))["state"] == State.CREATED.value
    stored = await raw(resize.id)
    assert stored["state"] == State.RUNNING.value and stored["lease_token"] == resize.lease_token


async def test_set_aside_unclaimable_only_looks_at_the_class() -> None:
    """Email.set_aside_unclaimable() sets aside broken Email documents only, never a (broken) Resize."""
    email = await Email().push()
    resize = await Resize().push()
    await Job.collection().update_many({}, {"$set": {"run_at": "not a date"}})
    assert await Email.set_aside_unclaimable() == 1
    assert (await raw(email.id))["state"] == State.FAILED.value
    stored = await raw(resize.id)
    assert stored["state"] == State.CREATED.value and stored.get("error") is None


async def test_claim_batch_only_claims_the_class() -> None:
    """claim_batch(Email, 10) returns the Email tasks and leaves every Resize CREATED and untouched."""
    resizes = [await Resize(src=f"{i}.png").push() for i in range(3)]
    emails = [await Email(to=f"u{i}").push() for i in range(2)]
    claimed = await claim_batch(Email, 10)
    assert sorted(t.id for t in claimed) == sorted(e.id for e in emails)
    for resize in resizes:
        untouched(await raw(resize.id))


@pytest.mark.wire  # mongomock has no partial indexes: its dedupe index is on the slot alone (see driver.py)
async def test_dedupe_is_per_class(backend: Any) -> None:
    """An Email and a Resize with the same dedupe_key are both stored: dedupe never spans sibling classes."""
    email = await Email(dedupe_key="same").push()
    resize = await Resize(dedupe_key="same").push()
    assert isinstance(resize, Resize)
    assert resize.id != email.id
    assert await Job.collection().count_documents({}) == 2
    assert (await Email(dedupe_key="same").push()).id == email.id, "dedupe still holds within the class"


async def test_one_worker_runs_both_classes() -> None:
    """A Worker([Email, Resize]) finishes all 3 Email and 3 Resize tasks; none is set aside as foreign."""
    pushed = [await Email(to=f"u{i}").push() for i in range(3)]
    pushed += [await Resize(src=f"{i}.png").push() for i in range(3)]

    async def all_ended() -> bool:
        ended = await Job.collection().count_documents({"state": {"$in": [State.FINISHED.value, State.FAILED.value]}})
        return ended == len(pushed)

    async with running(Worker([Email, Resize], concurrency=2)):
        await eventually(all_ended, timeout=30)
    rows = [row async for row in Job.collection().find({}, {"state": 1, "error": 1, "_class_id": 1})]
    failed = [(row.get("_class_id"), row.get("error")) for row in rows if row["state"] != State.FINISHED.value]
    assert not failed, f"{len(failed)} of {len(rows)} tasks did not finish: {failed}"


# ---------------------------------------------------------------- two processes

ROOT = f"""
from beanie_tasks import Task


class Job(Task):
    class Settings:
        is_root = True
        name = {COLLECTION!r}
"""

EMAIL_MODULE = ROOT + textwrap.dedent(
    """

    class Email(Job):
        to: str = "someone"

        async def run(self) -> str:
            return f"mailed {self.to}"
    """
)

RESIZE_MODULE = ROOT + textwrap.dedent(
    """

    class Resize(Job):
        src: str = "a.png"

        async def run(self) -> str:
            return f"resized {self.src}"
    """
)


@pytest.mark.wire
async def test_workers_importing_one_class_each_finish_everything(backend: Backend, db: Any, tmp_path: Path) -> None:
    """A worker process that only imports Email and one that only imports Resize (each with the Job root)
    share the collection: every task ends FINISHED, none is set aside FAILED by the other class's worker."""
    suffix = tmp_path.name.replace("-", "_")
    modules = {f"bt_email_{suffix}": EMAIL_MODULE, f"bt_resize_{suffix}": RESIZE_MODULE}
    for name, source in modules.items():
        (tmp_path / f"{name}.py").write_text(source)
    pushed = [await Email(to=f"u{i}").push() for i in range(4)] + [await Resize(src=f"{i}").push() for i in range(4)]
    assert backend.uri is not None
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"PYTHONPATH": path}
    processes = []
    try:
        for name in modules:
            command = [sys.executable, "-m", "beanie_tasks.cli", "worker", name, "--uri", backend.uri]
            command += ["--database", db.name, "--concurrency", "2", "--no-schedules"]
            with (tmp_path / f"{name}.log").open("wb") as log:
                process = await asyncio.create_subprocess_exec(
                    *command, cwd=tmp_path, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=log
                )
            processes.append(process)

        async def all_ended() -> bool:
            for name, process in zip(modules, processes, strict=False):
                assert process.returncode is None, f"worker {name} exited: {(tmp_path / f'{name}.log').read_text()}"
            ended = await Job.collection().count_documents(
                {"state": {"$in": [State.FINISHED.value, State.FAILED.value]}}
            )
            return ended == len(pushed)

        await eventually(all_ended, timeout=60)
    finally:
        for process in processes:
            await stop_subprocess(process)
    logs = [(tmp_path / f"{name}.log").read_text()[-2000:] for name in modules]
    rows = [row async for row in Job.collection().find({}, {"state": 1, "error": 1, "_class_id": 1})]
    failed = [(row.get("_class_id"), row.get("error")) for row in rows if row["state"] != State.FINISHED.value]
    assert not failed, f"{len(failed)} of {len(rows)} tasks did not finish: {failed}\n" + "\n".join(logs)
