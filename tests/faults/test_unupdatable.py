"""Unupdatable documents: a document the claim's own update cannot apply to is set aside, not retried forever.

A CREATED, due document whose ``attempts`` is not a number makes the claim's ``$inc`` fail
on the server. At the head of the claim order it would fail every claim of its class: it must
be set aside FAILED with its reason, while the worker keeps running every class, that
class's later tasks included, and ``queue()`` must not raise the server's error at its caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from bson import ObjectId
from workerkit import background, until

from beanie_tasks import State, Task, Worker

# The server refuses the claim's $inc on these (mongomock raises a TypeError of its own instead).
pytestmark = pytest.mark.wire

BAD_ATTEMPTS: list[Any] = ["zero", None]


class Head(Task):
    n: int = 0

    async def run(self) -> int:
        return self.n

    class Settings:
        name = "unupdatable_head"

    class TaskSettings:
        poll_interval = 0.1
        recovery_interval = 0.3


class Neighbour(Task):
    n: int = 0

    async def run(self) -> int:
        return self.n

    class Settings:
        name = "unupdatable_neighbour"

    class TaskSettings:
        poll_interval = 0.1
        recovery_interval = 0.3


@pytest.fixture(autouse=True)
async def models(init_tasks: Callable[..., Awaitable[None]]) -> None:
    await init_tasks(Head, Neighbour)


async def stored(task_class: type[Task], task_id: Any) -> dict[str, Any]:
    document = await task_class.collection().find_one({"_id": task_id})
    assert document is not None
    return dict(document)


async def insert_unupdatable() -> list[Any]:
    """Valid-looking CREATED, due Head documents at the head of the claim order, whose attempts are not numbers."""
    template_task = await Head(n=0).push()
    template = await stored(Head, template_task.id)
    await Head.collection().delete_one({"_id": template_task.id})
    ids = []
    for value in BAD_ATTEMPTS:
        document = template | {"_id": ObjectId(), "priority": 100, "attempts": value}
        await Head.collection().insert_one(document)
        ids.append(document["_id"])
    return ids


async def test_worker_sets_unupdatable_documents_aside_and_runs_every_class() -> None:
    """Every Neighbour task finishes within 10 s; the bad Head documents end FAILED naming attempts; later Heads run."""
    bad = await insert_unupdatable()
    neighbours = [await Neighbour(n=i).push() for i in range(6)]
    worker = Worker([Head, Neighbour], concurrency=2, use_change_stream=False, schedules=False)
    async with background(worker) as job:

        async def neighbours_done() -> bool | str:
            states = [(await stored(Neighbour, t.id))["state"] for t in neighbours]
            return all(s == State.FINISHED.value for s in states) or str(states)

        await until(neighbours_done, timeout=10, what="every Neighbour task to finish", job=job)
        heads = [await Head(n=i).push() for i in range(2)]

        async def rest_settled() -> bool | str:
            ids = [*bad, *(t.id for t in heads)]
            states = [(await stored(Head, i))["state"] for i in ids]
            return states == [State.FAILED.value] * len(bad) + [State.FINISHED.value] * len(heads) or str(states)

        await until(rest_settled, timeout=10, what="the bad Heads to be set aside and the good ones to run", job=job)
    for task_id, value in zip(bad, BAD_ATTEMPTS, strict=True):
        error = (await stored(Head, task_id)).get("error") or ""
        assert "attempts" in error, f"attempts={value!r}: {error!r}"


async def test_queue_does_not_raise_the_servers_error_at_its_caller() -> None:
    """``Head.queue()`` with unupdatable documents ahead of a good task yields the good task, raising nothing."""
    bad = await insert_unupdatable()
    good = await Head(n=42).push()
    stop = asyncio.Event()

    async def first_task() -> Head:
        async for task in Head.queue(stop=stop, use_change_stream=False):
            await task.finish()
            return task
        raise AssertionError("queue() ended without a task")

    try:
        task = await asyncio.wait_for(first_task(), timeout=10)
    finally:
        stop.set()
    assert task.id == good.id
    for task_id in bad:
        assert (await stored(Head, task_id))["state"] != State.RUNNING.value


async def test_a_batch_claim_sets_aside_only_the_refused_document() -> None:
    """A batch claim's ``update_many`` names no document when the server refuses one of them:
    the document set aside is the refused one (third in claim order), never a good task
    before it, and every good task is claimed, once."""
    from beanie_tasks import claim_batch

    good = [await Head(n=i, priority=50).push() for i in range(2)]
    template = await stored(Head, good[0].id)
    bad = template | {"_id": ObjectId(), "priority": 40, "attempts": "zero"}
    await Head.collection().insert_one(bad)
    later = [await Head(n=10 + i, priority=30).push() for i in range(2)]
    claimed = await claim_batch(Head, 8)
    assert sorted(t.n for t in claimed) == [0, 1, 10, 11]
    for task in [*good, *later]:
        assert (await stored(Head, task.id))["state"] == State.RUNNING.value, f"good task {task.n} was set aside"
    refused = await stored(Head, bad["_id"])
    assert refused["state"] == State.FAILED.value and "attempts" in (refused.get("error") or ""), refused
