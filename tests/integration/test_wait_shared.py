"""Task.wait at scale: every waiter on a collection shares one change stream.

A change stream's ``getMore`` holds a pooled connection while it waits for events, so
a stream per waiter starves the client's pool. These tests count the change-stream
cursors a client opens and still has open, and time pushes made while many wait.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from beanie import PydanticObjectId, init_beanie
from beanie.odm.utils.dump import get_dict
from pymongo import monitoring

from beanie_tasks import State, Task, WaitTimeout, wakeup
from beanie_tasks import store as storage
from beanie_tasks.driver import close_client
from beanie_tasks.task import claim
from beanie_tasks.testing import eventually

# 20 pushes made one after another while the waiters wait must take less than this in total.
PUSH_BOUND = 2.0
# How long any one phase may take before the test gives up on it (the old code needs long).
PHASE_TIMEOUT = 60.0
# How long the waiters may take to read their tasks once (1,000 take about 2 s).
READ_TIMEOUT = 20.0


class Job(Task):
    n: int


class Other(Task):
    n: int


class ChangeStreams(monitoring.CommandListener):
    """The change-stream cursors a client opens (``aggregate`` with ``$changeStream``) and still has open."""

    def __init__(self) -> None:
        self.opened: list[str] = []  # the collection of every stream opened
        self.open: dict[int, str] = {}  # cursor id -> collection
        self.pipelines: list[list[dict[str, Any]]] = []
        self._pending: dict[int, str] = {}
        self._get_mores: dict[int, int] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        command = event.command
        if event.command_name == "aggregate":
            pipeline = list(command.get("pipeline", ()))
            if pipeline and "$changeStream" in pipeline[0]:
                self.opened.append(command["aggregate"])
                self.pipelines.append(pipeline)
                self._pending[event.request_id] = command["aggregate"]
        elif event.command_name == "getMore":
            self._get_mores[event.request_id] = command["getMore"]
        elif event.command_name == "killCursors":
            for cursor in command.get("cursors", ()):
                self.open.pop(cursor, None)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        name = self._pending.pop(event.request_id, None)
        cursor = event.reply.get("cursor", {}).get("id")
        if name is not None and cursor:
            self.open[cursor] = name
        get_more = self._get_mores.pop(event.request_id, None)
        if get_more is not None and cursor == 0:
            self.open.pop(get_more, None)  # the server closed it

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._pending.pop(event.request_id, None)
        self._get_mores.pop(event.request_id, None)


Connect = Callable[..., Awaitable[ChangeStreams]]


@pytest.fixture
async def connect(backend: Any) -> AsyncIterator[Connect]:
    """``await connect(maxPoolSize=4)``: bind Job and Other to a fresh database on a new client, watched."""
    opened: list[tuple[Any, str]] = []

    async def _connect(**options: Any) -> ChangeStreams:
        streams = ChangeStreams()
        client = backend.client(event_listeners=[backend.counter, streams], **options)
        database = client[f"bt_{uuid.uuid4().hex[:12]}"]
        opened.append((client, database.name))
        await init_beanie(database=database, document_models=[Job, Other])
        return streams

    yield _connect
    for client, name in opened:
        await client.drop_database(name)
        await close_client(client)


async def stored_like_push(count: int) -> list[Job]:
    """``count`` Jobs written by one ``insert_many`` of the documents ``push()`` would store.

    Pushing 1,000 one by one takes about 6 s on SecantusDB; this takes a fraction of that.
    """
    reference = await Job(n=-1).push()
    pushed = await Job.collection().find_one({"_id": reference.id})
    now = Job.task_store().now()
    jobs = [
        Job.model_validate(
            {"id": PydanticObjectId(), "n": n, "run_at": now, "max_attempts": Job.task_options.max_attempts}
        )
        for n in range(count)
    ]
    documents = [get_dict(job, to_db=True, keep_nulls=True) for job in jobs]
    assert set(documents[0]) == set(pushed), "built like push() stores them"
    await Job.collection().insert_many(documents)
    return [reference, *jobs]


def finds(backend: Any) -> int:
    return int(backend.counter.by_name()["find"])


async def all_reading(backend: Any, count: int, *, timeout: float = READ_TIMEOUT) -> bool:
    """Until ``count`` reads were done (each waiter's first read is one ``find``); False after ``timeout``."""

    async def probe() -> bool:
        return finds(backend) >= count

    try:
        await eventually(probe, timeout=timeout)
    except AssertionError:
        return False
    return True


async def twenty_pushes() -> str | None:
    """Push 20 Jobs one after another; None when that took under ``PUSH_BOUND``, else what it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    done = 0

    async def push_all() -> None:
        nonlocal done
        for n in range(20):
            await Job(n=1000 + n).push()
            done += 1

    try:
        await asyncio.wait_for(push_all(), PHASE_TIMEOUT)
    except asyncio.TimeoutError:
        return f"only {done} of 20 pushes were done after {PHASE_TIMEOUT:g} s"
    took = loop.time() - started
    return None if took < PUSH_BOUND else f"20 pushes took {took:.2f} s"


async def finish_next() -> None:
    """Play the worker for one task: pop() the next ready Job and finish it with n * n."""
    task = await Job.pop()
    assert task is not None
    await task.finish(task.n * task.n)


async def finish_everything(*, batch: int) -> None:
    """Play the worker until no Job is ready: pop() and finish() one by one, or ``batch`` at a time.

    On SecantusDB a claim and a finish each scan the collection (about 0.25 s and 0.03 s
    at 1,000 tasks), so 1,000 tasks are claimed 100 at a time and finished in one bulk write.
    """
    while True:
        if batch > 1:
            tasks = await claim(Job, batch)
            if not tasks:
                return
            await Job.finish_many([(task, task.n * task.n) for task in tasks])
            continue
        task = await Job.pop()
        if task is None:
            return
        await task.finish(task.n * task.n)


async def waiters_do_not_stall_pushes(backend: Any, streams: ChangeStreams, jobs: list[Job], *, batch: int) -> None:
    waiters = [asyncio.create_task(job.wait(timeout=PHASE_TIMEOUT * 3)) for job in jobs]
    try:
        read = await all_reading(backend, len(jobs))
        stalled = await twenty_pushes()
        assert stalled is None, f"{stalled} while {len(jobs)} waiters waited ({finds(backend)} reads done)"
        assert read, f"after {READ_TIMEOUT:g} s only {finds(backend)} of {len(jobs)} waiters had read their task"
        assert len(streams.opened) == 1, f"{len(streams.opened)} change streams opened for one collection"
        assert len(streams.open) == 1, f"{len(streams.open)} change-stream cursors open for one collection"
        await asyncio.wait_for(finish_everything(batch=batch), PHASE_TIMEOUT)
        done = await asyncio.wait_for(asyncio.gather(*waiters), PHASE_TIMEOUT)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    assert [(d.id, d.state, d.result) for d in done] == [(j.id, State.FINISHED, j.n * j.n) for j in jobs]


@pytest.mark.slow  # the volume run; the pool-of-four variant below runs on both stacks
@pytest.mark.wire
async def test_a_thousand_waiters_share_one_stream_and_do_not_stall_pushes(backend: Any, connect: Connect) -> None:
    streams = await connect()
    jobs = await stored_like_push(999)
    backend.counter.reset()
    await waiters_do_not_stall_pushes(backend, streams, jobs, batch=100)


@pytest.mark.wire
async def test_fifty_waiters_on_a_pool_of_four_do_not_stall_pushes(backend: Any, connect: Connect) -> None:
    streams = await connect(maxPoolSize=4)
    jobs = [await Job(n=n).push() for n in range(50)]
    backend.counter.reset()
    await waiters_do_not_stall_pushes(backend, streams, jobs, batch=1)


@pytest.mark.wire
async def test_waiters_on_two_collections_use_two_streams(backend: Any, connect: Connect) -> None:
    streams = await connect()
    tasks: list[Task] = [await Job(n=n).push() for n in range(5)] + [await Other(n=n).push() for n in range(5)]
    backend.counter.reset()
    waiters = [asyncio.create_task(task.wait(timeout=PHASE_TIMEOUT)) for task in tasks]
    try:
        assert await all_reading(backend, len(tasks))
        assert Counter(streams.opened) == {"Job": 1, "Other": 1}
        assert sorted(streams.open.values()) == ["Job", "Other"]
        for cls in (Job, Other):
            while (claimed := await cls.pop()) is not None:
                await claimed.finish(claimed.n)
        done = await asyncio.wait_for(asyncio.gather(*waiters), PHASE_TIMEOUT)
    finally:
        for waiter in waiters:
            waiter.cancel()
    assert [d.state for d in done] == [State.FINISHED] * len(tasks)


@pytest.mark.wire
async def test_the_stream_outlives_its_last_waiter_briefly_then_closes(
    backend: Any, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wakeup, "LINGER", 1.0, raising=False)  # absent before the shared stream
    streams = await connect()
    first, second, third = [await Job(n=n).push() for n in range(3)]
    waiting = asyncio.create_task(first.wait(timeout=PHASE_TIMEOUT))
    assert await all_reading(backend, 1)
    await finish_next()
    assert (await waiting).state is State.FINISHED
    # The next waiter, within the linger, reuses the stream (and leaves by timing out).
    with pytest.raises(WaitTimeout):
        await second.wait(timeout=0.2)
    assert len(streams.opened) == 1, "a waiter arriving within the linger reuses the open stream"

    async def closed() -> bool:
        return not streams.open

    await eventually(closed, timeout=10)
    with pytest.raises(WaitTimeout):
        await third.wait(timeout=0.2)
    assert len(streams.opened) == 2, "the next waiter opens a new stream"


@pytest.mark.wire
async def test_only_changes_that_can_end_the_task_wake_its_waiter(backend: Any, connect: Connect) -> None:
    streams = await connect()
    watched = await Job(n=3).push()
    bystander = await Job(n=4).push()
    backend.counter.reset()
    # A poll interval longer than the test: every read after the first is the stream's doing.
    waiting = asyncio.create_task(watched.wait(timeout=PHASE_TIMEOUT, poll_interval=PHASE_TIMEOUT))
    try:
        assert await all_reading(backend, 1)
        running = await Job.pop()
        assert running is not None and running.id == watched.id
        await running.set_progress(0.5, "half way")
        other = await Job.pop()
        assert other is not None and other.id == bystander.id
        await other.finish(16)  # an end, but of another task
        await Job(n=5).push()
        await asyncio.sleep(0.5)
        assert finds(backend) == 1, "a claim, a progress update, an insert or another task's end woke the waiter"
        await running.finish(9)
        assert (await asyncio.wait_for(waiting, 10)).result == 9
    finally:
        waiting.cancel()
    assert finds(backend) == 2
    stages = streams.pipelines[0][1:]
    assert stages[-1] == {"$project": {"documentKey": 1, "updateDescription.updatedFields.state": 1}}


async def test_an_end_right_after_the_first_read_is_not_missed(
    init_tasks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waiter is subscribed before it reads, so an end just after that read wakes it."""
    await init_tasks(Job)
    task = await Job(n=6).push()
    real_read = storage.read_task
    ended_at: list[float] = []

    async def read_then_finish(collection: Any, task_id: Any) -> dict[str, Any] | None:
        document = await real_read(collection, task_id)
        if not ended_at:
            claimed = await Job.pop()
            assert claimed is not None
            await claimed.finish(36)
            ended_at.append(asyncio.get_running_loop().time())
        return document

    monkeypatch.setattr(storage, "read_task", read_then_finish)
    done = await task.wait(timeout=PHASE_TIMEOUT, poll_interval=PHASE_TIMEOUT)
    assert done.result == 36
    assert asyncio.get_running_loop().time() - ended_at[0] < 0.9


@pytest.mark.wire
async def test_a_broken_stream_falls_back_to_polling_and_reopens(
    backend: Any, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wakeup, "REOPEN_AFTER", 0.5)
    streams = await connect()
    admin = backend.client()
    try:
        await admin.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
    except Exception as exc:  # a real mongod without enableTestCommands
        await close_client(admin)
        pytest.skip(f"configureFailPoint is not available on this server: {type(exc).__name__}")
    tasks = [await Job(n=n).push() for n in range(3)]
    backend.counter.reset()
    waiters = [asyncio.create_task(task.wait(timeout=PHASE_TIMEOUT, poll_interval=0.2)) for task in tasks]
    try:
        assert await all_reading(backend, len(tasks))
        assert len(streams.opened) == 1
        fail_once = {"failCommands": ["getMore"], "errorCode": 2, "errmsg": "stream broken by the test"}
        await admin.admin.command({"configureFailPoint": "failCommand", "mode": {"times": 1}, "data": fail_once})
        assert await all_reading(backend, 2 * len(tasks))  # woken by the break, every waiter reads again

        async def reopened() -> bool:
            return len(streams.opened) == 2 and len(streams.open) == 1

        await eventually(reopened, timeout=10)
        await finish_everything(batch=1)
        done = await asyncio.wait_for(asyncio.gather(*waiters), 10)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await admin.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
        await close_client(admin)
    assert [d.result for d in done] == [0, 1, 4]
