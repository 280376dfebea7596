"""An idle worker costs little: one change stream per database, no claim before a task can be claimed.

The stream announces what becomes claimable, and when: a delayed push or a retry after
backoff wakes the worker when it falls due, not when it is written. A task delayed
before the worker started is found by one read when the stream opens. The maintenance
timer still recovers expired leases, but a round with nothing new sends no claim.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest

from beanie_tasks import State, Task, Worker, wakeup
from beanie_tasks.testing import eventually, running
from tests.conftest import Backend


class Started:
    at: ClassVar[dict[str, float]] = {}


class Ping(Task):
    name: str = ""

    async def run(self) -> None:
        Started.at[self.name] = asyncio.get_running_loop().time()


class Pong(Task):
    async def run(self) -> None: ...


class Elsewhere(Task):
    class Settings:
        name = "idle_elsewhere"

    async def run(self) -> None: ...


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    Started.at = {}
    await init_tasks(Ping, Pong, Elsewhere)


def names(backend: Backend) -> dict[str, int]:
    return dict(backend.counter.by_name())


@pytest.mark.wire
async def test_an_idle_worker_watches_one_stream_and_sends_no_claim(backend: Backend) -> None:
    worker = Worker([Ping, Pong, Elsewhere], concurrency=4)
    backend.counter.reset()
    async with running(worker):
        await asyncio.sleep(1.0)  # started: the stream is open and the first claims found nothing
        # A database's change stream opens with an aggregate on the database; the maintenance
        # probe is an aggregate on a collection.
        counted = zip(backend.counter.commands, backend.counter.targets, strict=True)
        opened = sum(1 for name, target in counted if name == "aggregate" and target == "")
        backend.counter.reset()
        await asyncio.sleep(6.0)
        idle = names(backend)
    assert opened == 1, f"expected one change stream for three classes in two collections, saw {opened}"
    assert idle.get("findAndModify", 0) == 0, f"an idle worker claimed: {idle}"
    # One getMore per STREAM_MAX_AWAIT, plus one maintenance round: one probe for every class.
    assert idle.get("getMore", 0) <= 3, idle
    assert set(idle) <= {"getMore", "aggregate"} and idle.get("aggregate", 0) <= 2, idle


@pytest.mark.wire
async def test_a_delayed_push_wakes_the_worker_when_it_falls_due_not_before(backend: Backend) -> None:
    loop = asyncio.get_running_loop()
    async with running(Worker([Ping], concurrency=2)):
        await asyncio.sleep(1.0)
        backend.counter.reset()
        pushed = loop.time()
        await Ping(name="later").push(delay=2.0)
        await asyncio.sleep(1.5)
        early = names(backend)
        await eventually(lambda: _finished(Ping, 1), timeout=10)
    assert early.get("findAndModify", 0) == 0, f"the worker claimed before the task was due: {early}"
    started = Started.at["later"] - pushed
    assert 2.0 <= started < 3.5, f"the delayed task started {started:.2f} s after its push (due after 2 s)"


@pytest.mark.wire
async def test_a_task_delayed_before_the_worker_started_runs_when_due() -> None:
    loop = asyncio.get_running_loop()
    pushed = loop.time()
    await Ping(name="waiting").push(delay=2.5)
    async with running(Worker([Ping], concurrency=2)):
        await eventually(lambda: _finished(Ping, 1), timeout=10)
    started = Started.at["waiting"] - pushed
    assert 2.5 <= started < 4.0, f"the delayed task started {started:.2f} s after its push (due after 2.5 s)"


async def test_without_a_stream_the_worker_polls_and_still_runs_delayed_work() -> None:
    await Ping(name="polled").push(delay=0.5)
    async with running(Worker([Ping], concurrency=2, use_change_stream=False)):
        await eventually(lambda: _finished(Ping, 1), timeout=10)
    assert "polled" in Started.at


async def _finished(task_class: type[Task], count: int) -> bool:
    return bool((await task_class.counts())[State.FINISHED] == count)


@pytest.mark.wire
async def test_each_of_several_delayed_pushes_wakes_the_worker_when_it_falls_due() -> None:
    """Every announced due time is kept, not only the earliest: the later ones still wake the worker."""
    loop = asyncio.get_running_loop()
    delays = {"first": 1.0, "second": 1.6, "third": 2.2}
    async with running(Worker([Ping], concurrency=2)):
        await asyncio.sleep(1.0)
        pushed = loop.time()
        for name, delay in delays.items():
            await Ping(name=name).push(delay=delay)
        await eventually(lambda: _finished(Ping, 3), timeout=15)
    for name, delay in delays.items():
        late = Started.at[name] - pushed - delay
        assert -0.05 <= late < 1.0, f"{name} started {late:+.2f} s from its due time"


class Quiet(Task):
    """Four classes in one collection, maintained (and safety-netted) every 0.2 s."""

    class Settings:
        is_root = True
        name = "idle_quiet"

    class TaskSettings:
        recovery_interval = 0.2


class QuietA(Quiet):
    async def run(self) -> None: ...


class QuietB(Quiet):
    async def run(self) -> None: ...


class QuietC(Quiet):
    async def run(self) -> None: ...


class QuietD(Quiet):
    async def run(self) -> None: ...


@pytest.mark.wire
async def test_the_safety_net_claims_one_queue_a_round_and_finds_what_a_stream_missed(
    backend: Backend, init_tasks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quiet worker's periodic claim (the safety net under its stream) tries one queue at a
    time, in turn, so its cost does not grow with the classes; and it still finds tasks that
    no change announced (here the stream's filter matches nothing at all)."""
    from beanie_tasks import store, worker

    classes: list[type[Task]] = [QuietA, QuietB, QuietC, QuietD]
    await init_tasks(Quiet, *classes)
    monkeypatch.setattr(worker, "CLAIM_EVERY_QUIET_ROUNDS", 2)
    monkeypatch.setattr(store, "claimable_changes", lambda collections=None: [{"$match": {"never": True}}])
    async with running(Worker(classes, concurrency=4)):
        await asyncio.sleep(1.0)  # started, and quiet: every stream up, nothing announced
        backend.counter.reset()
        await asyncio.sleep(3.0)
        counted = zip(backend.counter.commands, backend.counter.targets, strict=True)
        rounds = sum(1 for name, target in counted if name == "aggregate" and target == "idle_quiet")
        claims = names(backend).get("findAndModify", 0)
        for task_class in classes:
            await task_class().push()  # announced by no change: only the safety net can find them

        async def all_ran() -> bool:
            return all([(await c.counts())[State.FINISHED] == 1 for c in classes])

        await eventually(all_ran, timeout=20)
    assert rounds >= 6, f"only {rounds} maintenance rounds in 3 s"
    assert claims <= rounds // 2 + 1, f"{claims} claims in {rounds} quiet rounds: more than one queue per safety net"


@pytest.mark.wire
async def test_more_due_times_than_a_stream_remembers_still_start_on_time(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``MAX_DUES`` announced due times a stream keeps the earliest; once those are spent the
    worker reads the next one from the database, so every delayed task starts when it falls
    due, not at a later maintenance round (every 5 s)."""
    monkeypatch.setattr(wakeup, "MAX_DUES", 2)
    loop = asyncio.get_running_loop()
    delays = [1.0 + 0.6 * n for n in range(5)]
    async with running(Worker([Ping], concurrency=4)):
        await asyncio.sleep(1.0)
        pushed = loop.time()
        for n, delay in enumerate(delays):
            await Ping(name=f"d{n}").push(delay=delay)

        async def all_started() -> bool:
            return len(Started.at) == len(delays)

        await eventually(all_started, timeout=15)
    late = {f"d{n}": round(Started.at[f"d{n}"] - (pushed + delay), 2) for n, delay in enumerate(delays)}
    assert all(seconds < 1.5 for seconds in late.values()), f"started this long after falling due: {late}"
