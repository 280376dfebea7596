"""Batched claims and acknowledgements: exactly once, in claim order, guarded by the lease."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from beanie import PydanticObjectId

from beanie_tasks import DependencyType, Link, Priority, State, Task, depends_on
from beanie_tasks.batch import claim_batch, finish_batch
from beanie_tasks.task import utcnow


class Job(Task):
    n: int

    class TaskSettings:
        max_attempts = 3


class Other(Task):
    label: str = ""


class Part(Task):
    n: int


class Report(Task):
    parts: list[Link[Part]] = depends_on(DependencyType.ALL_OF, default_factory=list)


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Job, Other, Part, Report)


async def test_batch_is_claimed_in_priority_order_and_leased() -> None:
    plan = [
        (0, Priority.LOW),
        (1, Priority.MEDIUM),
        (2, Priority.HIGH),
        (3, Priority.MEDIUM),
        (4, 50),
        (5, Priority.LOW),
    ]
    for n, priority in plan:
        await Job(n=n, priority=priority).push()
    batch = await claim_batch(Job, 4, consumer_id="c1")
    assert [t.n for t in batch] == [4, 2, 1, 3]
    for task in batch:
        assert task.state is State.RUNNING and task.attempts == 1
        assert task.consumer_id == "c1" and task.lease_token and task.lease_expires_at
    rest = await claim_batch(Job, 4)
    assert [t.n for t in rest] == [0, 5]
    assert await claim_batch(Job, 4) == []
    assert await Job.pop() is None


async def test_not_ready_tasks_stay_out_of_the_batch() -> None:
    await Job(n=1).push(delay=timedelta(hours=1))
    await Job(n=2).push()
    cancelled = await Job(n=3).push()
    await cancelled.cancel()
    batch = await claim_batch(Job, 10)
    assert [t.n for t in batch] == [2]


async def test_concurrent_batch_claimers_take_every_task_exactly_once() -> None:
    ids = {(await Job(n=n, priority=n % 4).push()).id for n in range(48)}
    claimed: list[PydanticObjectId | None] = []

    async def batch_consumer(name: str, k: int) -> None:
        while batch := await claim_batch(Job, k, consumer_id=name):
            claimed.extend(t.id for t in batch)
            assert [t.priority for t in batch] == sorted((t.priority for t in batch), reverse=True)

    async def single_consumer() -> None:
        while (task := await Job.pop(consumer_id="single")) is not None:
            claimed.append(task.id)

    await asyncio.gather(batch_consumer("a", 5), batch_consumer("b", 7), batch_consumer("c", 16), single_consumer())
    assert len(claimed) == len(set(claimed)) == 48
    assert set(claimed) == ids
    counts = await Job.counts()
    assert counts[State.RUNNING] == 48 and counts[State.CREATED] == 0


async def test_finish_batch_stores_results_and_frees_dedupe_keys() -> None:
    await Job(n=1, dedupe_key="k1").push()
    await Job(n=2).push()
    batch = await claim_batch(Job, 2)
    ack = await finish_batch(batch, [{"r": t.n} for t in batch])
    assert ack.lost == [] and ack.finished == batch
    for task in batch:
        assert task.state is State.FINISHED and task.result == {"r": task.n}
        stored = await Job.get(task.id)
        assert stored is not None and stored.state is State.FINISHED and stored.result == {"r": task.n}
        assert stored.finished_at is not None and stored.lease_expires_at is None
    again = await Job(n=3, dedupe_key="k1").push()
    assert again.n == 3, "the dedupe key is free once its task finished"


async def test_acknowledgement_is_guarded_by_each_lease() -> None:
    for n in range(4):
        await Job(n=n).push()
    batch = await claim_batch(Job, 4, consumer_id="slow")
    stolen, cancelled = batch[1], batch[2]
    # The slow consumer's lease on one task expires and another consumer re-claims it.
    await Job.collection().update_one(
        {"_id": stolen.id}, {"$set": {"lease_expires_at": utcnow() - timedelta(seconds=1)}}
    )
    assert await Job.recover_expired() == 1
    thief = await Job.pop(consumer_id="thief")
    assert thief is not None and thief.id == stolen.id
    admin_view = await Job.get(cancelled.id)
    assert admin_view is not None and await admin_view.cancel()

    ack = await finish_batch(batch, ["late"] * 4)
    assert {t.id for t in ack.finished} == {batch[0].id, batch[3].id}
    assert {t.id for t in ack.lost} == {stolen.id, cancelled.id}
    now_stolen = await Job.get(stolen.id)
    assert now_stolen is not None and now_stolen.state is State.RUNNING
    assert now_stolen.consumer_id == "thief" and now_stolen.lease_token == thief.lease_token
    assert now_stolen.result is None
    now_cancelled = await Job.get(cancelled.id)
    assert now_cancelled is not None and now_cancelled.state is State.CANCELLED and now_cancelled.result is None
    await thief.finish("thief's result")
    assert (await Job.get(stolen.id)).result == "thief's result"  # type: ignore[union-attr]


async def test_finish_batch_mixes_classes_and_single_finishes() -> None:
    await Job(n=1).push()
    await Other(label="x").push()
    jobs = await claim_batch(Job, 5)
    others = await claim_batch(Other, 5)
    ack = await finish_batch([*jobs, *others])
    assert len(ack.finished) == 2 and ack.lost == []
    assert (await Job.counts())[State.FINISHED] == 1
    assert (await Other.counts())[State.FINISHED] == 1


async def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="between 1 and"):
        await claim_batch(Job, 0)
    with pytest.raises(TypeError):
        await claim_batch(Job, True)
    pushed = await Job(n=1).push()
    with pytest.raises(ValueError, match="not a task claimed"):
        await finish_batch([pushed])
    batch = await claim_batch(Job, 1)
    with pytest.raises(ValueError, match="results"):
        await finish_batch(batch, [1, 2])
    assert (await Job.get(pushed.id)).state is State.RUNNING  # type: ignore[union-attr]


async def test_malformed_documents_are_set_aside_not_returned() -> None:
    await Job(n=1).push()
    await Job.collection().insert_one(
        {
            "state": "CREATED",
            "priority": 99,
            "run_at": utcnow(),
            "created_at": utcnow(),
            "attempts": 0,
            "n": "not an int",
        }
    )
    batch = await claim_batch(Job, 5)
    assert [t.n for t in batch] == [1]
    counts = await Job.counts()
    assert counts[State.FAILED] == 1 and counts[State.RUNNING] == 1


@pytest.mark.wire
async def test_batch_costs_five_commands_for_sixteen_tasks(backend: Any) -> None:
    for n in range(16):
        await Job(n=n).push()
    backend.counter.reset()
    batch = await claim_batch(Job, 16)
    claim = backend.counter.by_name()
    backend.counter.reset()
    await finish_batch(batch)
    ack = backend.counter.by_name()
    assert len(batch) == 16
    assert claim == {"find": 2, "update": 1}
    # One bulk write, and one find that reads back which finishes landed and which tasks have dependents.
    assert ack == {"update": 1, "find": 1}


async def test_finishing_dependencies_in_a_batch_releases_their_dependent() -> None:
    parts = [await Part(n=n).push() for n in range(3)]
    report = await Report(parts=parts).push()  # type: ignore[arg-type]
    assert await Report.pop() is None
    first = await claim_batch(Part, 2)
    ack = await finish_batch(first)
    assert len(ack.finished) == 2
    assert await Report.pop() is None, "one dependency is still running"
    last = await claim_batch(Part, 2)
    assert len(last) == 1
    await finish_batch(last)
    released = await Report.pop()
    assert released is not None and released.id == report.id
