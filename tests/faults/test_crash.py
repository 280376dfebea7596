"""A consumer process killed mid-task loses nothing: its tasks run again once their leases expire."""

from __future__ import annotations

import os
import signal
from collections import Counter
from typing import Any

import pytest
from fault_tasks import EXECUTIONS, Job
from faultkit import Consumers, wait_until

from beanie_tasks import State

pytestmark = pytest.mark.wire


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Job)


@pytest.mark.parametrize("worker", [True, False], ids=["Worker", "queue"])
async def test_sigkilled_consumer_tasks_are_rerun_exactly_once(
    backend: Any, db: Any, consumers: Consumers, worker: bool
) -> None:
    executions = db[EXECUTIONS]
    hanging = [await Job(n=i, hang_first=True).push() for i in range(4)]
    victim = consumers.start(backend.uri, db.name, "Job", concurrency=4, name="victim", worker=worker)

    async def all_hanging_started() -> bool:
        started = await executions.count_documents({"event": "start", "consumer": {"$regex": "^victim"}})
        return started == 4

    await wait_until(all_hanging_started, timeout=30, what="the victim to start its 4 tasks")
    plain = [await Job(n=10 + i).push() for i in range(8)]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    assert await Job.find(Job.state == State.RUNNING).count() == 4  # held by a dead process

    consumers.start(backend.uri, db.name, "Job", concurrency=4, name="survivor", worker=worker)

    async def all_finished() -> bool:
        return await Job.find(Job.state == State.FINISHED).count() == 12

    await wait_until(all_finished, timeout=60, what="every task to finish after recovery")
    consumers.stop_all()

    counts = await Job.counts()
    assert counts[State.FINISHED] == 12 and counts[State.RUNNING] == 0 and counts[State.CREATED] == 0
    events = [e async for e in executions.find({})]
    starts = Counter(e["task"] for e in events if e["event"] == "start")
    runs = {(e["task"], e["token"]): e["consumer"] for e in events if e["event"] == "start"}
    for task in hanging + plain:
        stored = await Job.get(task.id)
        assert stored is not None
        # One delivery per run: a killed run + its re-run, or a single run. A lost lease costs a
        # redelivery, not an attempt. (A consumer stalled past its lease by a loaded machine would
        # add a run, and the redelivery that goes with it.)
        expected = 2 if task in hanging else 1
        assert stored.attempts == 1 and stored.attempts + stored.redeliveries == starts[task.id] >= expected
        # FINISHED once, by the last run: its result carries that claim's lease token.
        assert stored.result == {"n": stored.n, "token": stored.lease_token}
        assert runs[(task.id, stored.lease_token)].startswith("survivor") or task in plain
    if not worker:
        finishes = Counter(e["task"] for e in events if e["event"] == "finished")
        assert all(finishes[t.id] == 1 for t in hanging + plain)
    assert not [e for e in events if e["event"] in ("lease_lost", "failed")]
