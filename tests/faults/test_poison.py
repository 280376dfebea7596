"""Poison pills: no result, document or maintenance error stops a worker or makes a task run again.

* a result BSON cannot store fails the task at once ("result could not be stored"), run once;
* a document the driver cannot decode is set aside FAILED, and the worker keeps running;
* a failing maintenance round (lease recovery of one class) stops neither claiming nor the
  recovery of the other classes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import pytest
from beanie import init_beanie
from bson import ObjectId
from bson.datetime_ms import DatetimeMS
from bson.errors import InvalidBSON
from pymongo.errors import OperationFailure
from workerkit import background, long_ago, until

from beanie_tasks import Backoff, State, Task, Worker
from beanie_tasks.driver import close_client

TERMINAL = {State.FINISHED.value, State.FAILED.value, State.CANCELLED.value}
FAST = Backoff(base=0.05, jitter=0.0)


class Poison(Task):
    """``big`` returns an int BSON cannot store (over 8 bytes)."""

    big: bool = False
    runs: ClassVar[list[Any]] = []

    async def run(self) -> Any:
        Poison.runs.append(self.id)
        return 2**70 if self.big else "ok"

    class Settings:
        name = "poison_results"

    class TaskSettings:
        visibility_timeout = 2.0  # a stuck RUNNING task would come back within seconds
        max_attempts = 3
        backoff = FAST
        poll_interval = 0.1
        recovery_interval = 0.3


class Undecodable(Task):
    n: int = 0

    async def run(self) -> int:
        return self.n

    class Settings:
        name = "poison_undecodable"

    class TaskSettings:
        poll_interval = 0.1
        recovery_interval = 0.3


class Bystander(Task):
    n: int = 0

    async def run(self) -> int:
        return self.n

    class Settings:
        name = "poison_bystanders"

    class TaskSettings:
        max_attempts = 3
        poll_interval = 0.1
        recovery_interval = 0.3


class Unrecoverable(Task):
    """Its recover_expired is made to raise in the maintenance tests."""

    n: int = 0

    async def run(self) -> int:
        return self.n

    class Settings:
        name = "poison_unrecoverable"

    class TaskSettings:
        max_attempts = 3
        poll_interval = 0.1
        recovery_interval = 0.3


@pytest.fixture(autouse=True)
async def models(init_tasks: Callable[..., Awaitable[None]]) -> None:
    Poison.runs.clear()
    await init_tasks(Poison, Undecodable, Bystander, Unrecoverable)


async def stored(task_class: type[Task], task_id: Any, projection: dict[str, Any] | None = None) -> dict[str, Any]:
    document = await task_class.collection().find_one({"_id": task_id}, projection)
    assert document is not None
    return dict(document)


def worker_for(*classes: type[Task]) -> Worker:
    return Worker(list(classes), concurrency=2, use_change_stream=False, schedules=False)


async def test_result_bson_cannot_store_fails_the_task_once() -> None:
    """A result that cannot be stored fails the task at once, run exactly once; the worker keeps going."""
    poison = await Poison(big=True).push()
    others = [await Poison().push() for _ in range(3)]
    async with background(worker_for(Poison)) as job:

        async def settled() -> bool | str:
            state = (await stored(Poison, poison.id))["state"]
            done = [(await stored(Poison, t.id))["state"] for t in others]
            return (state in TERMINAL and all(s == State.FINISHED.value for s in done)) or f"{state}, {done}"

        await until(settled, timeout=30, what="the poison task to end and the others to finish", job=job)
        late = await Poison().push()

        async def late_finished() -> bool:
            return (await stored(Poison, late.id))["state"] == State.FINISHED.value

        await until(late_finished, timeout=10, what="a task pushed afterwards to finish", job=job)
    after = await stored(Poison, poison.id)
    assert Poison.runs.count(poison.id) == 1, (
        f"run() ran {Poison.runs.count(poison.id)} times; it ended {after['state']}: {after.get('error')}"
    )
    assert after["state"] == State.FAILED.value
    assert (after.get("error") or "").startswith("result could not be stored"), after.get("error")


EDGE_OF_TIME = datetime(9999, 12, 31, 23, 0, tzinfo=timezone.utc)
# A client in this zone cannot represent EDGE_OF_TIME as a Python datetime either.
FAR_EAST = timezone(timedelta(hours=14))


async def insert_undecodable(backend: Any, db: Any, document: dict[str, Any]) -> Any:
    """Store ``document`` with a date the task classes' client cannot decode; returns the client to close, if any.

    The date is ``DatetimeMS(2**62)``, outside Python's range. A server that itself decodes
    documents in Python (SecantusDB) cannot store that, so there it is a date at the very
    end of Python's range, and the classes are bound to a client whose ``tzinfo`` puts it
    outside: PyMongo raises the same InvalidBSON when it decodes the document.
    """
    try:
        await Undecodable.collection().insert_one(document | {"bad": DatetimeMS(2**62)})
        return None
    except OperationFailure as exc:
        if "out of range" not in str(exc):
            raise
    client = backend.client(tzinfo=FAR_EAST)
    await init_beanie(database=client[db.name], document_models=[Undecodable, Bystander])
    await Undecodable.collection().insert_one(document | {"bad": EDGE_OF_TIME})
    with pytest.raises(InvalidBSON):
        await Undecodable.collection().find_one({"_id": document["_id"]})
    return client


@pytest.mark.wire
async def test_undecodable_document_is_set_aside_and_the_worker_keeps_running(backend: Any, db: Any) -> None:
    """A document the driver cannot decode (a date outside Python's range) is set aside; Worker.run never raises."""
    template_task = await Undecodable(n=0).push()
    template = await stored(Undecodable, template_task.id)
    await Undecodable.collection().delete_one({"_id": template_task.id})
    bad_id = ObjectId()
    client = await insert_undecodable(backend, db, template | {"_id": bad_id, "priority": 100})
    try:
        good = await Undecodable(n=5).push()
        others = [await Bystander(n=i).push() for i in range(3)]
        async with background(worker_for(Undecodable, Bystander)) as job:

            async def settled() -> bool | str:
                bad_state = (await stored(Undecodable, bad_id, {"bad": 0}))["state"]
                states = [(await stored(Bystander, t.id))["state"] for t in others]
                states.append((await stored(Undecodable, good.id))["state"])
                ok = bad_state == State.FAILED.value and all(s == State.FINISHED.value for s in states)
                return ok or f"bad document {bad_state}, others {states}"

            await until(settled, timeout=30, what="the undecodable document to be set aside, the rest to run", job=job)
        error = (await stored(Undecodable, bad_id, {"bad": 0})).get("error") or ""
        assert "decode" in error.lower(), error
    finally:
        if client is not None:
            await close_client(client)


@pytest.mark.parametrize("failing_first", [True, False], ids=["failing-class-first", "failing-class-second"])
async def test_a_failing_maintenance_round_stops_neither_claims_nor_other_recovery(
    monkeypatch: pytest.MonkeyPatch, failing_first: bool
) -> None:
    """One class's lease recovery keeps raising: both classes' tasks still run, the other class still recovers."""
    calls: list[str] = []

    async def broken(class_ids: Any = None) -> int:
        calls.append("Unrecoverable")
        raise OperationFailure("boom")

    # The worker's maintenance recovers through each class's store, and only for a class with an expired lease.
    monkeypatch.setattr(Unrecoverable.task_store(), "recover_expired", broken)
    stuck = await Unrecoverable(n=8).push()
    orphan = await Bystander(n=9).push()
    held, lost = await Bystander.pop(consumer_id="died"), await Unrecoverable.pop(consumer_id="died")
    assert held is not None and held.id == orphan.id and lost is not None and lost.id == stuck.id
    plain = [await Unrecoverable(n=i).push() for i in range(2)] + [await Bystander(n=i).push() for i in range(2)]
    await Bystander.collection().update_one({"_id": orphan.id}, {"$set": {"lease_expires_at": long_ago()}})
    await Unrecoverable.collection().update_one({"_id": stuck.id}, {"$set": {"lease_expires_at": long_ago()}})

    classes = [Unrecoverable, Bystander] if failing_first else [Bystander, Unrecoverable]
    async with background(worker_for(*classes)) as job:

        async def settled() -> bool | str:
            states = [(await stored(type(t), t.id))["state"] for t in [*plain, orphan]]
            return all(s == State.FINISHED.value for s in states) or f"{states} (broken recovery ran {len(calls)}x)"

        await until(settled, timeout=15, what="every task, and the expired Bystander, to finish", job=job)
    assert calls, "the broken recovery was called"
    after = await stored(Bystander, orphan.id)
    assert after["lease_token"] != held.lease_token  # recovered, then claimed and finished by the worker
