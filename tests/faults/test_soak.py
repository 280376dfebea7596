"""Soak: 4 worker processes x 8 coroutines on 1,000 tasks with random failures, retries and dependencies.

The 1,000 tasks are fed in waves: the test pushes the next wave only while at most
``WINDOW`` tasks are in flight (CREATED, parked or RUNNING), and it moves ended tasks
out of the queue as it goes (it keeps each one's final document for the accounting, then
deletes it). SecantusDB has no index-backed sort: every claim scans and sorts the whole
collection, finished tasks included, so with all 1,000 in it claims crawl. Small waves and
a collection that holds only the live window keep claims fast on every backend. Children
link a parent of their own wave or the one before, so some wait parked for a running
parent and some are pushed after their parent already ended (finished or failed); a
parent leaves the collection only once no later child can link it and all its children
ended.

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


class Soak:
    """The tasks pushed so far, and the final documents of those moved out of the queue."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.parents: list[SoakJob] = []
        self.children: list[SoakChild] = []
        self.children_of: dict[Any, list[Any]] = {}
        self.final_parents: dict[Any, SoakJob] = {}
        self.final_children: dict[Any, SoakChild] = {}

    @property
    def pushed(self) -> int:
        return len(self.parents) + len(self.children)

    @property
    def ended(self) -> int:
        return len(self.final_parents) + len(self.final_children)

    async def feed_in_waves(self) -> None:
        """Push ``WAVES`` waves, each once the window has room for it; the plan depends on the seed only."""
        wave_size = WAVE_PARENTS + WAVE_CHILDREN

        async def room() -> bool | str:
            await self.harvest(keep_parents_from=len(self.parents) - WAVE_PARENTS)
            flying = await in_flight()
            return flying + wave_size <= WINDOW or f"{flying} in flight, {self.pushed} pushed, {self.ended} ended"

        for _ in range(WAVES):
            await wait_until(room, timeout=STALL, what="room in the window for the next wave", every=0.2)
            for _ in range(WAVE_PARENTS):
                fail_times = self.rng.choices([0, 1, 2, 3], weights=[70, 15, 10, 5])[0]
                parent = await SoakJob(n=len(self.parents), fail_times=fail_times).push()
                self.parents.append(parent)
                self.children_of[parent.id] = []
            recent = self.parents[-2 * WAVE_PARENTS :]  # this wave (mostly in flight) and the one before (some ended)
            for _ in range(WAVE_CHILDREN):
                parent, fail_times = self.rng.choice(recent), self.rng.choice([0, 0, 0, 1])
                child = await SoakChild(n=len(self.children), parent=parent, fail_times=fail_times).push()  # type: ignore[arg-type]
                self.children.append(child)
                self.children_of[parent.id].append(child.id)

    async def harvest(self, *, keep_parents_from: int) -> None:
        """Keep the final document of each ended task and delete it from the queue.

        Parents from index ``keep_parents_from`` on stay (a child pushed later may link
        them), and so does a parent while any of its children has not ended.
        """
        ended_children = [child async for child in SoakChild.find(ENDED)]
        self.final_children.update((child.id, child) for child in ended_children)
        await self._delete(SoakChild, [child.id for child in ended_children])
        candidates = [
            p.id
            for p in self.parents[: max(keep_parents_from, 0)]
            if p.id not in self.final_parents and all(c in self.final_children for c in self.children_of[p.id])
        ]
        if candidates:
            ended_parents = [parent async for parent in SoakJob.find({"_id": {"$in": candidates}} | ENDED)]
            self.final_parents.update((parent.id, parent) for parent in ended_parents)
            await self._delete(SoakJob, [parent.id for parent in ended_parents])

    @staticmethod
    async def _delete(task_class: type[SoakJob] | type[SoakChild], ids: list[Any]) -> None:
        """Delete exactly the documents read (a task that ended since the read stays for the next harvest)."""
        if ids:
            await task_class.collection().delete_many({"_id": {"$in": ids}})


@pytest.mark.slow
async def test_soak_exact_accounting(backend: Any, db: Any, consumers: Consumers) -> None:
    soak = Soak(seed=20260523)
    for p in range(PROCESSES):
        consumers.start(backend.uri, db.name, "Soak", concurrency=CONCURRENCY, name=f"p{p}", max_seconds=550)
    await soak.feed_in_waves()
    assert soak.pushed == TOTAL

    async def all_ended() -> bool | str:
        await soak.harvest(keep_parents_from=len(soak.parents))
        return soak.ended == TOTAL or f"{soak.ended} of {TOTAL} ended, {await in_flight()} in flight"

    await wait_until(all_ended, timeout=STALL, what=f"all {TOTAL} tasks to end", every=0.5)
    consumers.stop_all()
    assert await SoakJob.find_all().count() == 0 and await SoakChild.find_all().count() == 0, "nothing stored twice"

    events = [e async for e in db[EXECUTIONS].find({}, {"task": 1, "event": 1, "token": 1})]
    starts = Counter(e["task"] for e in events if e["event"] == "start")
    failures = Counter(e["task"] for e in events if e["event"] == "failed")
    run_tokens = {(e["task"], e["token"]) for e in events if e["event"] == "start"}
    finished_parents: dict[Any, Any] = {}
    for task in soak.parents:
        stored = soak.final_parents[task.id]
        assert starts[task.id] == stored.attempts + stored.redeliveries, f"{task.id}: one run per delivery"
        assert failures[task.id] == min(task.fail_times, 3)
        if task.fail_times < 3:
            assert stored.state is State.FINISHED and stored.attempts == failures[task.id] + 1
            assert (task.id, stored.lease_token) in run_tokens and stored.result["token"] == stored.lease_token
            finished_parents[task.id] = stored.finished_at
        else:
            assert stored.state is State.FAILED and stored.attempts == 3
    for child in soak.children:
        stored_child = soak.final_children[child.id]
        parent_id = child.parent.id  # type: ignore[attr-defined]
        assert starts[child.id] == stored_child.attempts + stored_child.redeliveries
        if parent_id in finished_parents:
            assert stored_child.state is State.FINISHED
            assert stored_child.attempts == failures[child.id] + 1 == child.fail_times + 1
            assert stored_child.started_at is not None and stored_child.started_at >= finished_parents[parent_id]
        else:
            assert stored_child.state is State.FAILED and stored_child.attempts == 0, "never ran: its parent failed"
