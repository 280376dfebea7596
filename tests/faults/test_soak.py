"""Soak: 4 worker processes x 8 coroutines on 1,000 tasks with random failures, retries and dependencies.

SecantusDB has no index-backed sort, so every claim scans the queue: on it the suite
runs the same soak on ``BT_SOAK_TASKS`` tasks (250 unless set; ``BT_SOAK_TASKS=1000``
for the full size, a few minutes). On ``MONGODB_URI`` it always runs 1,000. It runs on
the primary stack (Beanie 2) only; the crash and restart tests cover Motor.

The final accounting is exact: every task terminal; each ran once per attempt; a task
that finished took exactly its recorded failures + 1 attempts; one that failed used
all its attempts, or never ran because its parent failed; no child started before
its parent finished.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from typing import Any

import pytest
from fault_tasks import EXECUTIONS, SoakChild, SoakJob
from faultkit import Consumers, wait_until

from beanie_tasks import State
from beanie_tasks.driver import BEANIE_MAJOR

PROCESSES = 4
CONCURRENCY = 8
FULL_SIZE = 1000
SECANTUS_SIZE = int(os.environ.get("BT_SOAK_TASKS", "250"))

pytestmark = [
    pytest.mark.wire,
    pytest.mark.skipif(BEANIE_MAJOR < 2, reason="the soak runs on the primary stack (Beanie 2) only"),
    pytest.mark.timeout(max(480, SECANTUS_SIZE + 180)),
]


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(SoakJob, SoakChild)


def soak_size(backend: Any) -> int:
    if backend.name == "mongodb":
        return FULL_SIZE
    return SECANTUS_SIZE


async def test_soak_exact_accounting(backend: Any, db: Any, consumers: Consumers) -> None:
    size = soak_size(backend)
    rng = random.Random(20260523)
    parents = [
        await SoakJob(n=i, fail_times=rng.choices([0, 1, 2, 3], weights=[70, 15, 10, 5])[0]).push()
        for i in range(size * 4 // 5)
    ]
    children = [
        await SoakChild(n=i, parent=rng.choice(parents), fail_times=rng.choice([0, 0, 0, 1])).push()  # type: ignore[arg-type]
        for i in range(size - len(parents))
    ]
    for p in range(PROCESSES):
        consumers.start(backend.uri, db.name, "Soak", concurrency=CONCURRENCY, name=f"p{p}")

    async def all_terminal() -> bool | str:
        parents_done = await SoakJob.find({"state": {"$in": ["FINISHED", "FAILED"]}}).count()
        children_done = await SoakChild.find({"state": {"$in": ["FINISHED", "FAILED"]}}).count()
        return parents_done + children_done == size or f"{parents_done} + {children_done} ended"

    await wait_until(all_terminal, timeout=max(300.0, float(size)), what=f"all {size} tasks to end", every=0.5)
    consumers.stop_all()

    events = [e async for e in db[EXECUTIONS].find({}, {"task": 1, "event": 1, "token": 1})]
    starts = Counter(e["task"] for e in events if e["event"] == "start")
    failures = Counter(e["task"] for e in events if e["event"] == "failed")
    run_tokens = {(e["task"], e["token"]) for e in events if e["event"] == "start"}
    finished_parents: dict[Any, Any] = {}
    for task in parents:
        stored = await SoakJob.get(task.id)
        assert stored is not None
        assert starts[task.id] == stored.attempts, f"{task.id}: one run per attempt"
        assert failures[task.id] == min(task.fail_times, 3)
        if task.fail_times < 3:
            assert stored.state is State.FINISHED and stored.attempts == failures[task.id] + 1
            assert (task.id, stored.lease_token) in run_tokens and stored.result["token"] == stored.lease_token
            finished_parents[task.id] = stored.finished_at
        else:
            assert stored.state is State.FAILED and stored.attempts == 3
    for child in children:
        stored_child = await SoakChild.get(child.id)
        assert stored_child is not None
        parent_id = child.parent.id  # type: ignore[attr-defined]
        assert starts[child.id] == stored_child.attempts
        if parent_id in finished_parents:
            assert stored_child.state is State.FINISHED
            assert stored_child.attempts == failures[child.id] + 1 == child.fail_times + 1
            assert stored_child.started_at is not None and stored_child.started_at >= finished_parents[parent_id]
        else:
            assert stored_child.state is State.FAILED and stored_child.attempts == 0, "never ran: its parent failed"
