"""Ambiguous claims do not burn attempts: a claim applied by the server whose reply was lost is given back.

The claim picks its lease token before it sends the command, so when the reply is lost the
consumer still knows which lease it would have held, and can hand the task back at once:
CREATED again, with the attempt the lost claim took given back, claimable at once. (Otherwise
the task sits RUNNING under a token nobody holds until its lease expires, and recovery
charges it an attempt for a delivery that never reached a handler.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from beanie import init_beanie
from faultkit import FailPoints
from pymongo.errors import PyMongoError

from beanie_tasks import State, Task, claim_batch
from beanie_tasks.driver import close_client

pytestmark = pytest.mark.wire

WRITE_CONCERN_ERROR = {"code": 100, "errmsg": "write applied, acknowledgement failed"}
# The server applies the write, then reports an error the driver labels retryable.
APPLIED_REPLY_LOST = {"writeConcernError": WRITE_CONCERN_ERROR, "errorLabels": ["RetryableWriteError"]}


class Claimed(Task):
    n: int

    class Settings:
        name = "ambiguous_claims"

    class TaskSettings:
        visibility_timeout = 60  # no lease expires within a test: only the claim itself may give it back
        max_attempts = 3


@pytest.fixture(autouse=True)
async def client(backend: Any, db: Any) -> AsyncIterator[Any]:
    """Bind the class to a client the failpoints target, without retryable writes (the reply stays lost)."""
    targeted = backend.client(appname=FailPoints.APP_NAME, retryWrites=False, socketTimeoutMS=5000)
    await init_beanie(database=targeted[db.name], document_models=[Claimed])
    yield targeted
    await close_client(targeted)


async def raw(task_id: Any) -> dict[str, Any]:
    document = await Claimed.collection().find_one({"_id": task_id})
    assert document is not None
    return dict(document)


async def given_back(ids: list[Any], *, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The stored documents, once all are CREATED again (or as they are when ``timeout`` passes)."""
    deadline = time.monotonic() + timeout
    while True:
        documents = [await raw(i) for i in ids]
        if all(d["state"] == State.CREATED.value for d in documents) or time.monotonic() > deadline:
            return documents
        await asyncio.sleep(0.05)


async def test_claim_applied_but_reply_lost_is_given_back_unspent(failpoints: FailPoints) -> None:
    """pop() whose findAndModify was applied but answered with an error: the task is CREATED, attempts 0."""
    pushed = await Claimed(n=1).push()
    await failpoints.arm(["findAndModify"], **APPLIED_REPLY_LOST)
    try:
        got = await Claimed.pop()
    except PyMongoError:
        got = None
    assert got is None
    (after,) = await given_back([pushed.id])
    assert after["state"] == State.CREATED.value and after["attempts"] == 0, (
        f"after a claim whose reply was lost the task is {after['state']} with attempts {after['attempts']}, "
        f"leased to {after.get('consumer_id')!r} under a token nobody holds"
    )
    task = await Claimed.pop()  # claimable at once, with no lease to wait out
    assert task is not None and task.id == pushed.id and task.attempts == 1


async def test_batch_claim_applied_but_reply_lost_is_given_back_unspent(failpoints: FailPoints) -> None:
    """claim_batch() whose update_many was applied but answered with an error: every task is CREATED, attempts 0."""
    pushed = [await Claimed(n=i).push() for i in range(4)]
    await failpoints.arm(["update"], **APPLIED_REPLY_LOST)
    try:
        got = await claim_batch(Claimed, 4)
    except PyMongoError:
        got = []
    assert got == []
    after = await given_back([t.id for t in pushed])
    states = [(d["state"], d["attempts"]) for d in after]
    assert states == [(State.CREATED.value, 0)] * 4, (
        f"(state, attempts) after a batch claim whose reply was lost: {states}"
    )
    again = await claim_batch(Claimed, 4)
    assert sorted(t.n for t in again) == [0, 1, 2, 3] and all(t.attempts == 1 for t in again)
