"""Dropped connections and failing commands (``configureFailPoint``) at every transition.

Each transition is either retried safely by the driver (retryable writes: SecantusDB
advertises a replica set, like Atlas) or reported to the caller, and always leaves the
task in a state that the next claim, a repeated call or lease recovery handles. Every
test runs with retryable writes on and off, so the library is correct either way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from beanie import init_beanie
from fault_tasks import Job
from faultkit import FailPoints
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from beanie_tasks import PushError, State
from beanie_tasks.driver import close_client

pytestmark = pytest.mark.wire

WRITE_CONCERN_ERROR = {"code": 100, "errmsg": "write applied, acknowledgement failed"}


@pytest.fixture(params=[True, False], ids=["retryable-writes", "no-retryable-writes"])
async def retry_writes(request: pytest.FixtureRequest, backend: Any, db: Any) -> AsyncIterator[bool]:
    """Bind Job to a client whose commands the failpoints target (by application name)."""
    client = backend.client(appname=FailPoints.APP_NAME, retryWrites=request.param, socketTimeoutMS=5000)
    await init_beanie(database=client[db.name], document_models=[Job])
    yield request.param
    await close_client(client)


async def stored(task: Job) -> Job:
    found = await Job.get(task.id)
    assert found is not None
    return found


async def claimed() -> Job:
    task = await Job.pop()
    assert task is not None
    return task


# ------------------------------------------------------------------ claim (findAndModify)


async def test_claim_with_dropped_connection(retry_writes: bool, failpoints: FailPoints) -> None:
    pushed = await Job(n=1).push()
    await failpoints.arm(["findAndModify"], closeConnection=True)
    if retry_writes:
        task = await claimed()  # the driver retried once, transparently
    else:
        with pytest.raises(ConnectionFailure):
            await Job.pop()
        assert (await stored(pushed)).state is State.CREATED  # nothing was applied
        task = await claimed()
    assert task.id == pushed.id and task.attempts == 1


async def test_claim_with_error_code_is_reported_and_changes_nothing(
    retry_writes: bool, failpoints: FailPoints
) -> None:
    pushed = await Job(n=1).push()
    await failpoints.arm(["findAndModify"], errorCode=2)  # BadValue: not retryable
    with pytest.raises(OperationFailure):
        await Job.pop()
    assert (await stored(pushed)).state is State.CREATED
    assert (await claimed()).attempts == 1


async def test_ambiguous_claim_never_runs_twice(retry_writes: bool, failpoints: FailPoints) -> None:
    """The server claims the task but the reply is an error: the claim is undone by its token, unspent."""
    pushed = await Job(n=1).push()
    await failpoints.arm(["findAndModify"], writeConcernError=WRITE_CONCERN_ERROR, errorLabels=["RetryableWriteError"])
    if retry_writes:
        task = await claimed()  # the retry is answered from the server's record of the first
        assert task.attempts == 1
        assert await Job.pop() is None
        return
    with pytest.raises(PyMongoError):
        await Job.pop()
    given_back = await stored(pushed)
    # Nobody holds the token the lost claim used, so no handler ran: it is CREATED again, unspent.
    assert given_back.state is State.CREATED and given_back.attempts == 0 and given_back.lease_token is None
    task = await claimed()
    assert task.id == pushed.id and task.attempts == 1
    assert await Job.pop() is None  # ... and nobody can run it twice
    await task.finish()


# ------------------------------------------------- finish / fail (findAndModify when terminal, else update)


async def test_finish_with_dropped_connection(retry_writes: bool, failpoints: FailPoints) -> None:
    await Job(n=1).push()
    task = await claimed()
    await failpoints.arm(["findAndModify"], closeConnection=True, times=1 if not retry_writes else 2)
    with pytest.raises(ConnectionFailure):
        await task.finish("done")
    left = await stored(task)
    assert left.state is State.RUNNING and left.lease_token == task.lease_token  # still ours
    await task.finish("done")  # calling again is safe
    assert (await stored(task)).state is State.FINISHED


async def test_finish_dropped_once_is_retried_by_the_driver(retry_writes: bool, failpoints: FailPoints) -> None:
    if not retry_writes:
        pytest.skip("only retryable writes retry by themselves")
    await Job(n=1).push()
    task = await claimed()
    await failpoints.arm(["findAndModify"], closeConnection=True)
    await task.finish("done")
    assert (await stored(task)).result == "done"


async def test_finish_with_error_code_is_reported_and_the_task_stays_ours(
    retry_writes: bool, failpoints: FailPoints
) -> None:
    await Job(n=1).push()
    task = await claimed()
    await failpoints.arm(["findAndModify"], errorCode=2)
    with pytest.raises(OperationFailure):
        await task.finish()
    assert (await stored(task)).state is State.RUNNING
    await task.finish()
    assert (await stored(task)).state is State.FINISHED


@pytest.mark.parametrize("outcome", ["finish", "fail-retry", "fail-final"])
async def test_ambiguous_transition_is_idempotent(retry_writes: bool, failpoints: FailPoints, outcome: str) -> None:
    """The server applies the write but the caller gets an error; calling again is success, not LeaseLost."""
    await Job(n=1).push()
    task = await claimed()
    token = task.lease_token
    command = "update" if outcome == "fail-retry" else "findAndModify"  # a terminal write returns its flags
    await failpoints.arm([command], writeConcernError=WRITE_CONCERN_ERROR, errorLabels=["RetryableWriteError"])

    async def transition() -> None:
        if outcome == "finish":
            await task.finish({"ok": 1})
        else:
            await task.fail("boom", retry=outcome == "fail-retry")

    if retry_writes:
        await transition()  # retried by the driver, answered from the server's record
    else:
        with pytest.raises(PyMongoError):
            await transition()
        await transition()  # the first attempt was applied: this must not raise LeaseLost
    after = await stored(task)
    assert after.attempts == 1
    if outcome == "finish":
        assert after.state is State.FINISHED and after.lease_token == token and after.result == {"ok": 1}
    elif outcome == "fail-retry":
        assert after.state is State.CREATED and after.last_error == "boom"
    else:
        assert after.state is State.FAILED and after.error == "boom"


async def test_finish_whose_connection_times_out_after_the_server_applied_it(
    backend: Any, db: Any, failpoints: FailPoints
) -> None:
    """A truly ambiguous write: the client gives up on the socket while the server still applies it."""
    client = backend.client(appname=FailPoints.APP_NAME, retryWrites=False, socketTimeoutMS=300)
    await init_beanie(database=client[db.name], document_models=[Job])
    try:
        await Job(n=1).push()
        task = await claimed()
        await failpoints.arm(["findAndModify"], blockConnection=True, blockTimeMS=1000)
        with pytest.raises(ConnectionFailure):
            await task.finish("once")
        await task.finish("once")  # applied by the server or not: this call settles it, without LeaseLost
        after = await stored(task)
        assert after.state is State.FINISHED and after.lease_token == task.lease_token
    finally:
        await close_client(client)


# ------------------------------------------------------------------ push (insert)


async def test_push_with_dropped_connection_raises_push_error_and_can_be_retried(
    retry_writes: bool, failpoints: FailPoints
) -> None:
    job = Job(n=7)
    await failpoints.arm(["insert"], closeConnection=True, times=2 if retry_writes else 1)
    with pytest.raises(PushError, match="push\\(\\) again on the same object is safe") as raised:
        await job.push()
    assert isinstance(raised.value.__cause__, ConnectionFailure)
    assert job.id is None and await Job.find_all().count() == 0  # nothing written
    await job.push()
    assert await Job.find_all().count() == 1


async def test_ambiguous_push_is_not_stored_twice(retry_writes: bool, failpoints: FailPoints) -> None:
    job = Job(n=8)
    await failpoints.arm(["insert"], writeConcernError=WRITE_CONCERN_ERROR, errorLabels=["RetryableWriteError"])
    if retry_writes:
        await job.push()
    else:
        with pytest.raises(PushError):
            await job.push()
        assert await Job.find_all().count() == 1  # it was stored after all ...
        await job.push()  # ... and pushing again keeps it at one
    assert await Job.find_all().count() == 1
    assert job.id is not None and (await stored(job)).n == 8
