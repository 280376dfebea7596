"""Bad input gets a clear error and writes nothing; malformed documents are set aside, never run."""

from __future__ import annotations

import asyncio
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pytest
from bson import ObjectId
from fault_tasks import Job
from faultkit import wait_until
from pydantic import ValidationError

from beanie_tasks import PushError, State, Task, TransitionError


class Blob(Task):
    data: str = ""

    class Settings:
        name = "fault_blobs"


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Job, Blob)


async def nothing_written() -> None:
    assert await Job.find_all().count() == 0
    assert await Blob.find_all().count() == 0


# ------------------------------------------------------------------ at push()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", "not a number"),
        ("n", None),
        ("n", [1]),
        ("fail_times", {"a": 1}),
        ("priority", 101),
        ("priority", -1),
        ("priority", "high"),
        ("max_attempts", 0),
        ("dedupe_key", ""),
        ("attempts", -1),
    ],
)
async def test_invalid_field_is_rejected_at_push(field: str, value: Any) -> None:
    job = Job(n=1)
    object.__setattr__(job, field, value)  # as if set by code that skipped validation
    with pytest.raises(ValidationError, match=field):
        await job.push()
    assert job.id is None
    await nothing_written()


async def test_invalid_fields_are_rejected_when_built() -> None:
    with pytest.raises(ValidationError):
        Job(n="x")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Job(n=1, priority=1000)
    with pytest.raises(ValidationError):
        Job()  # type: ignore[call-arg]


async def test_payload_over_16_mb_raises_push_error() -> None:
    with pytest.raises(PushError, match="16 MB"):
        await Blob(data="x" * (16 * 1024 * 1024 + 1)).push()
    await nothing_written()


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"run_at": datetime(2030, 1, 1)}, ValueError, "timezone-aware"),
        ({"run_at": "2030-01-01T00:00:00Z"}, TypeError, "datetime"),
        ({"run_at": date(2030, 1, 1)}, TypeError, "datetime"),
        ({"run_at": 1_900_000_000}, TypeError, "datetime"),
        ({"delay": -1}, ValueError, "negative"),
        ({"delay": timedelta(seconds=-0.5)}, ValueError, "negative"),
        ({"delay": "5"}, TypeError, "delay"),
        ({"delay": True}, TypeError, "delay"),
        ({"delay": 1, "run_at": datetime.now(timezone.utc)}, ValueError, "either"),
    ],
)
async def test_bad_schedule_is_rejected(arguments: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        await Job(n=1).push(**arguments)
    await nothing_written()


async def test_pushing_the_same_object_twice_is_refused() -> None:
    job = await Job(n=1).push()
    with pytest.raises(TransitionError, match="already pushed"):
        await job.push()
    assert await Job.find_all().count() == 1


# ------------------------------------------------------------------ malformed documents


async def insert_variant(template: dict[str, Any], **changes: Any) -> ObjectId:
    document = dict(template, _id=ObjectId())
    for name, value in changes.items():
        if value is REMOVE:
            document.pop(name, None)
        else:
            document[name] = value
    await Job.collection().insert_one(document)
    return document["_id"]


REMOVE = object()


async def test_consumer_sets_malformed_documents_aside_and_keeps_serving() -> None:
    template_task = await Job(n=0).push()
    template = await Job.collection().find_one({"_id": template_task.id})
    await template_task.cancel()
    bad = {
        "missing field": await insert_variant(template, n=REMOVE),
        "wrong type": await insert_variant(template, n="seven"),
        "unknown state": await insert_variant(template, state="PAUSED"),
        "no state": await insert_variant(template, state=REMOVE),
        "no run_at": await insert_variant(template, run_at=REMOVE),
        "run_at not a date": await insert_variant(template, run_at="2020-01-01"),
        "running without lease": await insert_variant(template, state="RUNNING", lease_expires_at=None),
        "another class": await insert_variant(template, _class_id="SomeOtherTask"),
    }
    good = [await Job(n=i).push() for i in range(1, 4)]

    stop = asyncio.Event()
    ran: list[int] = []

    async def consume() -> None:
        async for task in Job.queue(stop=stop, use_change_stream=False):
            ran.append(task.n)
            await task.finish()

    consumer = asyncio.create_task(consume())
    try:

        async def all_set_aside() -> bool:
            return await Job.find({"_id": {"$in": list(bad.values())}, "state": State.FAILED.value}).count() == len(bad)

        await wait_until(all_set_aside, timeout=30, what="every malformed document to be set aside")
        late = await Job(n=99).push()  # the loop is still serving
        await wait_until(lambda: _finished(late.id), timeout=30, what="a task pushed after the sweep to run")
    finally:
        stop.set()
        await asyncio.wait_for(consumer, 10)
    assert not consumer.exception()
    assert sorted(ran) == [1, 2, 3, 99]  # only well-formed tasks of this class ran
    for task in good:
        assert await _finished(task.id)
    reasons = {kind: (await Job.collection().find_one({"_id": oid}))["error"] for kind, oid in bad.items()}
    assert "n: Field required" in reasons["missing field"]
    assert "n: Input should be a valid integer" in reasons["wrong type"]
    assert "'PAUSED' is not a known state" in reasons["unknown state"]
    assert "<missing>" in reasons["no state"]
    assert "run_at" in reasons["no run_at"] and "run_at" in reasons["run_at not a date"]
    assert "lease_expires_at" in reasons["running without lease"]
    assert "SomeOtherTask" in reasons["another class"] and "not Job" in reasons["another class"]


async def _finished(task_id: Any) -> bool:
    stored = await Job.collection().find_one({"_id": task_id}, {"state": 1})
    return stored is not None and stored["state"] == State.FINISHED.value


async def test_sweep_reports_what_it_set_aside(caplog: pytest.LogCaptureFixture) -> None:
    template_task = await Job(n=0).push()
    template = await Job.collection().find_one({"_id": template_task.id})
    oid = await insert_variant(template, state="ZOMBIE")
    assert await Job.set_aside_unclaimable() == 1
    assert await Job.set_aside_unclaimable() == 0  # idempotent
    assert any(str(oid) in r.getMessage() and "ZOMBIE" in r.getMessage() for r in caplog.records)
    assert (await Job.get(template_task.id)).state is State.CREATED  # type: ignore[union-attr]
