"""Soak: 4 worker processes x 8 coroutines on 1,000 tasks with random failures, retries and dependencies.

The 1,000 tasks are fed in waves: the test pushes the next wave only while at most
``WINDOW`` tasks are in flight (CREATED, parked or RUNNING), so the queue stays small
while the total is 1,000. SecantusDB has no index-backed sort, so each claim sorts the
whole ready queue; with all 1,000 queued at once claims would crawl, with waves they
stay fast on every backend. Children link a parent of their own wave or the one
before, so some wait parked for a running parent and some are pushed after their
parent already ended (finished or failed).

The final accounting is exact: every task terminal; each ran once per attempt; a task
that finished took exactly its recorded failures + 1 attempts (so it finished once, under
its last lease); one that failed used all its attempts, or never ran because its parent
failed; no child started before its parent finished.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from fault_tasks import EXECUTIONS, SoakChild, SoakJob
from faultkit import Consumers, wait_until

from beanie_tasks import State

PROCESSES = 4
CONCURRENCY = 8
TOTAL = 1000
WINDOW = 100  # at most this many tasks in flight at once
WAVE_PARENTS = 20
WAVE_CHILDREN = 5  # so 4 of every 5 tasks are parents, 1 a dependent child
WAVES = TOTAL // (WAVE_PARENTS + WAVE_CHILDREN)
STALL = 120.0  # no progress for this long fails the test
IN_FLIGHT = {"state": {"$in": [State.CREATED.value, State.RUNNING.value]}}
ENDED = {"state": {"$in": [State.FINISHED.value, State.FAILED.value]}}

pytestmark = [pytest.mark.wire, pytest.mark.timeout(600)]


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(SoakJob, SoakChild)


async def in_flight() -> int:
    return int(await SoakJob.find(IN_FLIGHT).count() + await SoakChild.find(IN_FLIGHT).count())


async def ended() -> int:
    return int(await SoakJob.find(ENDED).count() + await SoakChild.find(ENDED).count())


async def feed_in_waves(rng: random.Random, parents: list[SoakJob], children: list[SoakChild]) -> None:
    """Push ``WAVES`` waves, each once the window has room for it; the plan depends on the seed only."""
    wave_size = WAVE_PARENTS + WAVE_CHILDREN

    async def room() -> bool | str:
        flying = await in_flight()
        return flying + wave_size <= WINDOW or f"{flying} in flight, {len(parents) + len(children)} pushed"

    for _ in range(WAVES):
        await wait_until(room, timeout=STALL, what="room in the window for the next wave", every=0.1)
        for _ in range(WAVE_PARENTS):
            fail_times = rng.choices([0, 1, 2, 3], weights=[70, 15, 10, 5])[0]
            parents.append(await SoakJob(n=len(parents), fail_times=fail_times).push())
        recent = parents[-2 * WAVE_PARENTS :]  # this wave (mostly in flight) and the one before (some ended)
        for _ in range(WAVE_CHILDREN):
            parent, fail_times = rng.choice(recent), rng.choice([0, 0, 0, 1])
            children.append(await SoakChild(n=len(children), parent=parent, fail_times=fail_times).push())  # type: ignore[arg-type]


async def test_soak_exact_accounting(backend: Any, db: Any, consumers: Consumers) -> None:
    rng = random.Random(20260523)
    parents: list[SoakJob] = []
    children: list[SoakChild] = []
    for p in range(PROCESSES):
        consumers.start(backend.uri, db.name, "Soak", concurrency=CONCURRENCY, name=f"p{p}", max_seconds=550)
    await feed_in_waves(rng, parents, children)
    assert len(parents) + len(children) == TOTAL

    async def all_terminal() -> bool | str:
        done = await ended()
        return done == TOTAL or f"{done} of {TOTAL} ended"

    await wait_until(all_terminal, timeout=STALL, what=f"all {TOTAL} tasks to end", every=0.5)
    consumers.stop_all()

    events = [e async for e in db[EXECUTIONS].find({}, {"task": 1, "event": 1, "token": 1})]
    starts = Counter(e["task"] for e in events if e["event"] == "start")
    failures = Counter(e["task"] for e in events if e["event"] == "failed")
    run_tokens = {(e["task"], e["token"]) for e in events if e["event"] == "start"}
    finished_parents: dict[Any, Any] = {}
    stored_parents = {t.id: t async for t in SoakJob.find_all()}
    stored_children = {t.id: t async for t in SoakChild.find_all()}
    assert len(stored_parents) == len(parents) and len(stored_children) == len(children), "nothing stored twice"
    for task in parents:
        stored = stored_parents[task.id]
        assert starts[task.id] == stored.attempts, f"{task.id}: one run per attempt"
        assert failures[task.id] == min(task.fail_times, 3)
        if task.fail_times < 3:
            assert stored.state is State.FINISHED and stored.attempts == failures[task.id] + 1
            assert (task.id, stored.lease_token) in run_tokens and stored.result["token"] == stored.lease_token
            finished_parents[task.id] = stored.finished_at
        else:
            assert stored.state is State.FAILED and stored.attempts == 3
    for child in children:
        stored_child = stored_children[child.id]
        parent_id = child.parent.id  # type: ignore[attr-defined]
        assert starts[child.id] == stored_child.attempts
        if parent_id in finished_parents:
            assert stored_child.state is State.FINISHED
            assert stored_child.attempts == failures[child.id] + 1 == child.fail_times + 1
            assert stored_child.started_at is not None and stored_child.started_at >= finished_parents[parent_id]
        else:
            assert stored_child.state is State.FAILED and stored_child.attempts == 0, "never ran: its parent failed"
