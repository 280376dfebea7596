"""Rate and concurrency limits: held in the database, atomic, and free for tasks without limit keys."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, ClassVar

import pytest

from beanie_tasks import RateLimit, State, Task, Worker
from beanie_tasks.limits import LIMITS_COLLECTION, SLOT_CLAIM_GRACE, LimitPolicy
from beanie_tasks.task import as_utc, utcnow
from beanie_tasks.testing import eventually as wait_until
from beanie_tasks.testing import running


class Gate:
    events: ClassVar[list[str]] = []
    gate: ClassVar[asyncio.Event | None] = None


class PerKey(Task):
    label: str

    class TaskSettings:
        key_concurrency = 1
        visibility_timeout = 2.0
        recovery_interval = 0.2

    async def run(self) -> str:
        Gate.events.append(f"start {self.label}")
        assert Gate.gate is not None
        await Gate.gate.wait()
        return self.label


class Throttled(Task):
    class TaskSettings:
        rate_limit = "3/s"

    async def run(self) -> None:
        return None


class KeyThrottled(Task):
    class TaskSettings:
        key_rate_limit = (2, 1.0)

    async def run(self) -> None:
        return None


class Unlimited(Task):
    async def run(self) -> None:
        return None


async def eventually(probe: Callable[[], Awaitable[Any]], timeout: float = 15.0) -> Any:
    return await wait_until(probe, timeout)


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    Gate.events = []
    Gate.gate = asyncio.Event()
    await init_tasks(PerKey, Throttled, KeyThrottled)


async def all_finished(task_class: type[Task], count: int) -> bool:
    return bool(await task_class.find(task_class.state == State.FINISHED).count() == count)


def test_rate_limits_parse_and_reject_bad_values() -> None:
    assert RateLimit.parse("x", "10/s") == RateLimit(10, 1.0)
    assert RateLimit.parse("x", "100/m") == RateLimit(100, 60.0)
    assert RateLimit.parse("x", "5/2s") == RateLimit(5, 2.0)
    assert RateLimit.parse("x", (3, 0.5)) == RateLimit(3, 0.5)
    with pytest.raises(ValueError, match="not a rate like"):
        RateLimit.parse("rate_limit", "ten per second")
    with pytest.raises(ValueError, match="count >= 1"):
        RateLimit.parse("rate_limit", (0, 1))
    with pytest.raises(TypeError, match="rate_limit"):
        RateLimit.parse("rate_limit", 10)

    with pytest.raises(ValueError, match="key_concurrency"):

        class Bad(Task):
            class TaskSettings:
                key_concurrency = 0


async def test_a_full_concurrency_key_keeps_its_task_created_with_priority_and_attempts() -> None:
    first = await PerKey(label="a1", concurrency_key="a", priority=5).push()
    second = await PerKey(label="a2", concurrency_key="a", priority=5).push()
    other = await PerKey(label="b1", concurrency_key="b").push()
    async with running(Worker([PerKey], concurrency=3)):
        await eventually(lambda: _async(len(Gate.events) == 2))
        await asyncio.sleep(0.5)  # several claim rounds: the second "a" must still wait
        assert sorted(Gate.events) == ["start a1", "start b1"]
        waiting = await PerKey.collection().find_one({"_id": second.id})
        assert waiting is not None and waiting["state"] == State.CREATED.value
        # Parked while its key is full: its own run_at is kept aside, priority and attempts untouched.
        assert waiting["attempts"] == 0 and waiting["priority"] == 5 and waiting["limit_parked"] is True
        assert as_utc(waiting["limit_run_at"]) == second.run_at
        assert Gate.gate is not None
        Gate.gate.set()
        await eventually(lambda: all_finished(PerKey, 3))
    for task in (first, second, other):
        stored = await PerKey.get(task.id)
        assert stored is not None and stored.attempts == 1
    assert Gate.events.index("start a2") > Gate.events.index("start a1")


async def test_class_rate_limit_spreads_starts_over_windows() -> None:
    for _ in range(7):
        await Throttled().push()
    async with running(Worker([Throttled], concurrency=7)):
        await eventually(lambda: all_finished(Throttled, 7))
    starts = sorted([t.started_at async for t in Throttled.find_all()])  # type: ignore[type-var]
    # 3 per second: 7 starts need 3 windows, so the first and last are over a second apart.
    assert (starts[-1] - starts[0]).total_seconds() > 1.0
    assert {t.attempts async for t in Throttled.find_all()} == {1}


async def test_key_rate_limit_only_throttles_its_own_key() -> None:
    for _ in range(5):
        await KeyThrottled(rate_limit_key="slow").push()
    for _ in range(5):
        await KeyThrottled().push()  # no key: never limited
    async with running(Worker([KeyThrottled], concurrency=10)):
        await eventually(lambda: all_finished(KeyThrottled, 10))
    keyed = sorted([t.started_at async for t in KeyThrottled.find(KeyThrottled.rate_limit_key == "slow")])  # type: ignore[type-var]
    assert (keyed[-1] - keyed[0]).total_seconds() > 1.0  # 2 per second: 5 starts need 3 windows
    assert {t.attempts async for t in KeyThrottled.find_all()} == {1}


@pytest.mark.wire
async def test_limit_bookkeeping_is_paid_only_where_a_limit_applies(backend: Any) -> None:
    store = PerKey.task_store()
    assert store.limits.active
    assert not LimitPolicy.of(Unlimited.task_options).active  # such classes are claimed with one findAndModify
    backend.counter.reset()
    grant = await store.acquire(None, None, "token")  # no key: nothing to take
    assert grant is not None and backend.counter.total == 0
    await PerKey(label="free").push()
    backend.counter.reset()
    assert await PerKey.pop(consumer_id="me") is not None
    assert backend.counter.by_name() == {"find": 1, "findAndModify": 1}  # read the candidate, claim it
    await PerKey(label="keyed", concurrency_key="k").push()
    backend.counter.reset()
    assert await PerKey.pop(consumer_id="me") is not None
    assert backend.counter.by_name() == {"find": 1, "update": 1, "findAndModify": 1}  # + one slot update


async def test_lease_recovery_frees_the_slot_of_a_dead_worker() -> None:
    await PerKey(label="dies", concurrency_key="k").push()
    store = PerKey.task_store()
    task = await PerKey.pop(consumer_id="dead")
    assert task is not None
    slots = PerKey.collection().database[LIMITS_COLLECTION]
    holders = (await slots.find_one({"scope": store.limit_scope}))["holders"]
    assert [h["t"] for h in holders] == [task.lease_token]
    await PerKey.collection().update_one(
        {"_id": task.id}, {"$set": {"lease_expires_at": utcnow() - timedelta(seconds=1)}}
    )
    assert await PerKey.recover_expired() == 1

    def settled_before() -> Any:
        return store.now() - timedelta(seconds=SLOT_CLAIM_GRACE)

    assert await store.reconcile_slots(settled_before()) == 0  # a holder this young may still be claiming
    await slots.update_many({"scope": store.limit_scope}, {"$set": {"holders.0.at": utcnow() - timedelta(minutes=5)}})
    assert await store.reconcile_slots(settled_before()) == 1
    assert await slots.find_one({"scope": store.limit_scope}) is None  # an empty slot document is removed
    assert await store.reconcile_slots(settled_before()) == 0


WORKER_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from beanie import init_beanie
    from beanie_tasks import Task, Worker
    from beanie_tasks.driver import client_for

    class OnePerKey(Task):
        class TaskSettings:
            key_concurrency = 1

        async def run(self) -> None:
            runs = type(self).collection().database["runs"]
            start = time.time()
            await asyncio.sleep(0.15)
            await runs.insert_one({"key": self.concurrency_key, "start": start, "end": time.time(), "pid": os.getpid()})

    class FourPerSecond(Task):
        class TaskSettings:
            rate_limit = "4/s"

        async def run(self) -> None:
            return None

    async def main() -> None:
        client = client_for(sys.argv[1])
        await init_beanie(database=client[sys.argv[2]], document_models=[OnePerKey, FourPerSecond])
        worker = Worker([OnePerKey, FourPerSecond], concurrency=4, grace_period=5)
        worker.install_signal_handlers()
        print("ready", flush=True)
        await worker.run()

    asyncio.run(main())
    """
)


@pytest.mark.wire
async def test_limits_hold_across_two_worker_processes(backend: Any, db: Any) -> None:
    from beanie import init_beanie

    class OnePerKey(Task):
        async def run(self) -> None: ...

    class FourPerSecond(Task):
        async def run(self) -> None: ...

    await init_beanie(database=db, document_models=[OnePerKey, FourPerSecond])
    for i in range(8):
        await OnePerKey(concurrency_key=f"k{i % 2}").push()
    for _ in range(9):
        await FourPerSecond().push()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-c", WORKER_SCRIPT, backend.uri, db.name]
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL) for _ in range(2)]  # noqa: ASYNC220
    try:

        async def done() -> bool:
            return await all_finished(OnePerKey, 8) and await all_finished(FourPerSecond, 9)

        await eventually(done, timeout=60)
    finally:
        for process in workers:
            process.send_signal(signal.SIGTERM)
        for process in workers:
            assert process.wait(30) == 0
    runs = [row async for row in db["runs"].find({})]
    assert len(runs) == 8
    for key in ("k0", "k1"):
        spans = sorted((r["start"], r["end"]) for r in runs if r["key"] == key)
        assert all(b[0] >= a[1] for a, b in itertools.pairwise(spans)), f"{key} ran twice at once"
    starts = sorted([t.started_at async for t in FourPerSecond.find_all()])  # type: ignore[type-var]
    assert (starts[-1] - starts[0]).total_seconds() > 1.0  # 4 per second: 9 starts need 3 windows
    assert {t.attempts async for t in OnePerKey.find_all()} | {t.attempts async for t in FourPerSecond.find_all()} == {
        1
    }
    assert not await db[LIMITS_COLLECTION].find_one({"holders.0": {"$exists": True}})  # every slot given back


async def _async(value: Any) -> Any:
    return value
