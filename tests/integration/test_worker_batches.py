"""The worker on a backlog: free slots are claimed in one batch, finishes are acknowledged in bulk.

Every guarantee of one-at-a-time claims holds: each task runs once, in claim order, its
dependents are told, a cancelled task's outcome is dropped, and a result that cannot be
stored fails that task alone. A lone task on an idle queue still costs one claim and one
finish.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from typing import Any, ClassVar

import pytest
from beanie import Link

from beanie_tasks import DependencyType, Priority, State, Task, Worker, depends_on
from beanie_tasks.acks import FinishBatcher
from beanie_tasks.testing import eventually, running
from tests.conftest import Backend

BACKLOG = 128


class Record:
    runs: ClassVar[Counter[str]] = Counter()
    order: ClassVar[list[int]] = []
    gate: ClassVar[asyncio.Event | None] = None


class Chore(Task):
    n: int = 0

    async def run(self) -> int:
        Record.runs[str(self.id)] += 1
        Record.order.append(self.n)
        return self.n


class Slow(Task):
    """Waits for the test's gate, so several are running at once."""

    n: int = 0

    async def run(self) -> Any:
        assert Record.gate is not None
        await Record.gate.wait()
        return 2**70 if self.n == 0 else self.n  # n = 0 returns what BSON cannot store


class Upstream(Task):
    n: int = 0

    async def run(self) -> int:
        assert Record.gate is not None
        await Record.gate.wait()
        return self.n


class Downstream(Task):
    parent: Link[Upstream] = depends_on(DependencyType.DIRECT)

    async def run(self) -> str:
        return "told"


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    Record.runs = Counter()
    Record.order = []
    Record.gate = asyncio.Event()
    await init_tasks(Chore, Slow, Upstream, Downstream)


def commands_without_streams(backend: Backend) -> Counter[str]:
    """Commands sent, less the change stream's getMores (how often a server answers those is its own)."""
    names = backend.counter.by_name()
    names.pop("getMore", None)
    names.pop("aggregate", None)
    return names


async def finished(task_class: type[Task], count: int) -> bool:
    return bool((await task_class.counts())[State.FINISHED] == count)


async def test_a_backlog_costs_under_half_a_command_per_task_and_each_task_runs_once(backend: Backend) -> None:
    """Concurrency 16 on a backlog: free slots are claimed in one batch and finishes share bulk writes."""
    for n in range(BACKLOG):
        await Chore(n=n).push()
    backend.counter.reset()
    worker = Worker([Chore], concurrency=16, use_change_stream=False)
    async with running(worker):
        await eventually(lambda: finished(Chore, BACKLOG), timeout=60)
    sent = commands_without_streams(backend)
    assert set(Record.runs.values()) == {1} and len(Record.runs) == BACKLOG, Record.runs
    assert {t.attempts async for t in Chore.find_all()} == {1}  # type: ignore[type-var]
    assert {t.result async for t in Chore.find_all()} == set(range(BACKLOG))  # type: ignore[type-var]
    # One at a time this is 2 commands per task; batched it is about 0.3 (5 per 16 tasks, measured
    # in bench/). The bound leaves room for a loaded machine, where fewer finishes share a window.
    per_task = sum(sent.values()) / BACKLOG
    assert per_task <= 0.75, f"{per_task:.2f} commands per task: {dict(sent)}"
    assert worker.acks.bulk_writes >= 2


async def test_a_batch_claim_takes_tasks_in_claim_order() -> None:
    """Priority first, then due time: a batch claim is the same order one-at-a-time claims give."""
    for n in range(BACKLOG):
        await Chore(n=n, priority=Priority.HIGH if n % 2 else Priority.LOW).push()
    async with running(Worker([Chore], concurrency=8, use_change_stream=False)):
        await eventually(lambda: finished(Chore, BACKLOG), timeout=60)
    highs = [n for n in Record.order if n % 2]
    first_low = next(i for i, n in enumerate(Record.order) if n % 2 == 0)
    assert first_low >= len(highs) - 8, f"a LOW task started before the HIGH backlog was claimed: {Record.order}"


@pytest.mark.wire  # commands are counted by the driver's monitoring, which mongomock does not emit
async def test_a_lone_task_costs_one_claim_and_one_finish(backend: Backend) -> None:
    worker = Worker([Chore], concurrency=16)
    async with running(worker):
        await asyncio.sleep(0.5)  # idle now
        backend.counter.reset()
        task = await Chore(n=7).push()
        await eventually(lambda: finished(Chore, 1), timeout=20)
        await asyncio.sleep(0.2)
        sent = backend.counter.on(Chore.collection().name)  # not the worker's registry refresh
    stored = await Chore.get(task.id)
    assert stored is not None and stored.result == 7
    writes = sent["findAndModify"] + sent["update"]
    assert writes == 2, f"a lone task took {dict(sent)}"
    assert worker.acks.bulk_writes == 0


async def test_in_a_bulk_finish_a_cancelled_task_is_dropped_and_an_unstorable_result_fails_alone() -> None:
    slow = [await Slow(n=n).push() for n in range(6)]
    worker = Worker([Slow], concurrency=8, use_change_stream=False)
    async with running(worker):

        async def all_running() -> bool:
            return bool((await Slow.counts())[State.RUNNING] == 6)

        await eventually(all_running, timeout=20)
        cancelled = await Slow.get(slow[1].id)
        assert cancelled is not None and await cancelled.cancel()
        assert Record.gate is not None
        Record.gate.set()

        async def settled() -> bool:
            counts = await Slow.counts()
            return bool(counts[State.FINISHED] == 4 and counts[State.FAILED] + counts[State.CANCELLED] == 2)

        await eventually(settled, timeout=20)
    poisoned = await Slow.get(slow[0].id)
    assert poisoned is not None and poisoned.state is State.FAILED
    assert poisoned.error is not None and poisoned.error.startswith("result could not be stored")
    dropped = await Slow.get(slow[1].id)
    assert dropped is not None and dropped.state is State.CANCELLED
    for task in slow[2:]:
        done = await Slow.get(task.id)
        assert done is not None and done.state is State.FINISHED and done.result == task.n


async def test_a_bulk_finish_that_landed_counts_even_for_a_task_deleted_before_the_read_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A cleanup job (or a short TTL) may delete a finished task at once. When every guarded
    update of the bulk write matched, each task is finished: none is finished again one by
    one, or logged as vanished."""
    from beanie_tasks import claim_batch, driver

    for n in range(3):
        await Chore(n=n).push()
    batch = await claim_batch(Chore, 3, consumer_id="bulk")
    landed = driver.bulk_update

    async def landed_then_deleted(collection: Any, updates: Any) -> int:
        matched = await landed(collection, updates)
        await collection.delete_one({"_id": batch[0].id})
        return matched

    monkeypatch.setattr(driver, "bulk_update", landed_then_deleted)
    batcher = FinishBatcher(window=0.05)
    with caplog.at_level("WARNING", logger="beanie_tasks"):
        await asyncio.gather(*(batcher.finish(task, task.n) for task in batch))
    assert batcher.bulk_writes == 1
    assert all(task.state is State.FINISHED for task in batch)
    assert not [r for r in caplog.records if "no longer exists" in r.getMessage()], caplog.text
    assert await Chore.get(batch[0].id) is None


async def test_dependents_are_told_when_their_dependency_finishes_in_a_bulk_write() -> None:
    parents = [await Upstream(n=n).push() for n in range(5)]
    children = [await Downstream(parent=parent).push() for parent in parents]  # type: ignore[arg-type]
    worker = Worker([Upstream, Downstream], concurrency=8, use_change_stream=False)
    async with running(worker):

        async def parents_running() -> bool:
            return bool((await Upstream.counts())[State.RUNNING] == 5)

        await eventually(parents_running, timeout=20)
        assert Record.gate is not None
        Record.gate.set()
        await eventually(lambda: finished(Downstream, 5), timeout=30)
    assert worker.acks.bulk_writes >= 1
    for child in children:
        done = await Downstream.get(child.id)
        assert done is not None and done.result == "told"


async def test_a_zero_window_finishes_every_task_on_its_own(backend: Backend) -> None:
    for n in range(8):
        await Chore(n=n).push()
    worker = Worker([Chore], concurrency=8, ack_window=0, use_change_stream=False)
    async with running(worker):
        await eventually(lambda: finished(Chore, 8), timeout=30)
    assert worker.acks.bulk_writes == 0
    with pytest.raises(ValueError, match="ack_window"):
        Worker([Chore], ack_window=-1)


async def test_the_batcher_reports_a_failed_bulk_write_to_every_waiter() -> None:
    """A bulk write that fails reaches each waiter, whose settle then retries on its own."""

    class Broken(Exception):
        pass

    tasks = [await Chore(n=n).push() for n in range(3)]
    claimed = [await Chore.pop() for _ in tasks]
    batcher = FinishBatcher(window=0.01)

    async def failing_finish_many(pairs: Any) -> Any:
        raise Broken("bulk write lost")

    original = Chore.finish_many
    Chore.finish_many = failing_finish_many  # type: ignore[method-assign,assignment]
    try:
        outcomes = await asyncio.gather(*(batcher.finish(t, 1) for t in claimed if t), return_exceptions=True)
    finally:
        Chore.finish_many = original  # type: ignore[method-assign]
    assert all(isinstance(o, Broken) for o in outcomes), outcomes
    for task in claimed:
        assert task is not None
        await task.finish(1)  # the retry: a plain finish still holds the lease
    assert (await Chore.counts())[State.FINISHED] == 3


BATCH_WORKER = textwrap.dedent(
    """
    import asyncio, sys

    from beanie import init_beanie

    from beanie_tasks import Task, Worker
    from beanie_tasks.driver import client_for


    class BatchedChore(Task):
        n: int = 0

        async def run(self) -> None:
            runs = BatchedChore.collection().database["runs"]
            await runs.insert_one({"task": self.id, "by": self.consumer_id})


    async def main() -> None:
        client = client_for(sys.argv[1])
        await init_beanie(database=client[sys.argv[2]], document_models=[BatchedChore])
        worker = Worker([BatchedChore], concurrency=16, consumer_id=sys.argv[3], grace_period=5)
        worker.install_signal_handlers()
        print("ready", flush=True)
        await worker.run()

    asyncio.run(main())
    """
)


@pytest.mark.wire
@pytest.mark.slow
async def test_three_batching_worker_processes_run_every_task_exactly_once(backend: Backend, db: Any) -> None:
    from beanie import init_beanie

    class BatchedChore(Task):
        n: int = 0

        async def run(self) -> None: ...

    await init_beanie(database=db, document_models=[BatchedChore])
    total = 300
    for n in range(total // 2):
        await BatchedChore(n=n).push()
    command = [sys.executable, "-c", BATCH_WORKER, backend.uri or "", db.name]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    workers = [
        subprocess.Popen([*command, f"w{i}"], env=env, stdout=subprocess.PIPE)  # noqa: ASYNC220
        for i in range(3)
    ]
    try:
        for process in workers:
            assert process.stdout is not None and process.stdout.readline().strip() == b"ready"
        for n in range(total // 2, total):  # the rest arrive while the workers drain
            await BatchedChore(n=n).push()

        async def all_done() -> bool:
            return bool((await BatchedChore.counts())[State.FINISHED] == total)

        await eventually(all_done, timeout=120)
    finally:
        for process in workers:
            process.send_signal(signal.SIGTERM)
        for process in workers:
            process.wait(30)
    runs = [row async for row in db["runs"].find({})]
    per_task = Counter(row["task"] for row in runs)
    assert len(per_task) == total and set(per_task.values()) == {1}, "a task ran twice or never"
    assert {t.attempts async for t in BatchedChore.find_all()} == {1}  # type: ignore[type-var]
