"""Races between dependencies and dependents, with several OS processes and randomised orderings.

- dependencies finish (or fail) in worker processes while the test pushes their dependents;
- several ALL_OF dependencies end at the same moment, released by a barrier, in separate
  processes, some failing while the others finish.

No dependent may stay blocked, none may run before its links are met, and each one
ends as the rules predict.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import random
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from multiprocessing.synchronize import Barrier, Event
from typing import Any

import pytest
from beanie import Link, init_beanie

from beanie_tasks import DependencyType, OnFailure, State, Task, depends_on
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.store import Store
from tests.conftest import Backend

pytestmark = [pytest.mark.wire, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SPAWN = multiprocessing.get_context("spawn")
WAIT = 60.0


class Leaf(Task):
    label: int
    succeed: bool = True


class Joined(Task):
    label: int
    first: Link[Leaf] | None = depends_on(DependencyType.DIRECT, default=None)
    parts: list[Link[Leaf]] = depends_on(DependencyType.ALL_OF, default_factory=list)
    mirrors: list[Link[Leaf]] = depends_on(DependencyType.ANY_OF, default_factory=list)
    tolerant: list[Link[Leaf]] = depends_on(DependencyType.ALL_OF, on_failure=OnFailure.RUN, default_factory=list)


MODELS: list[Any] = [Leaf, Joined]


async def connect(uri: str, name: str) -> Any:
    client = client_for(uri, serverSelectionTimeoutMS=10_000)
    await init_beanie(database=client[name], document_models=MODELS)
    return client


async def complete(task: Leaf | Joined) -> None:
    if isinstance(task, Leaf) and not task.succeed:
        await task.fail("planned failure", retry=False)
    else:
        await task.finish()


# ------------------------------------------------------------- worker processes


def streaming_worker(uri: str, name: str, seed: int, ready: Barrier, stop: Event) -> None:
    """Claim and complete Leaf and Joined tasks, with random pauses, until told to stop."""
    asyncio.run(_streaming_worker(uri, name, seed, ready, stop))


async def _streaming_worker(uri: str, name: str, seed: int, ready: Barrier, stop: Event) -> None:
    logging.basicConfig(level=logging.WARNING)
    rng = random.Random(seed)
    client = await connect(uri, name)
    ready.wait(WAIT)
    try:
        while True:
            task: Leaf | Joined | None = await (Leaf.pop() if rng.random() < 0.6 else Joined.pop())
            if task is None:
                if stop.is_set():
                    return
                await asyncio.sleep(rng.random() * 0.01)
                continue
            await asyncio.sleep(rng.random() * 0.03)
            await complete(task)
    finally:
        await close_client(client)


def burst_worker(uri: str, name: str, rounds: int, start: Barrier, together: Barrier, done: Barrier) -> None:
    """Each round: claim one Leaf, wait for the other workers, end it at the same moment."""
    asyncio.run(_burst_worker(uri, name, rounds, start, together, done))


async def _burst_worker(uri: str, name: str, rounds: int, start: Barrier, together: Barrier, done: Barrier) -> None:
    client = await connect(uri, name)
    try:
        for _ in range(rounds):
            start.wait(WAIT)
            task = None
            for _ in range(2000):
                task = await Leaf.pop()
                if task is not None:
                    break
                await asyncio.sleep(0.005)
            assert task is not None
            together.wait(WAIT)
            await complete(task)
            done.wait(WAIT)
    finally:
        await close_client(client)


# ------------------------------------------------------------------ checks


@pytest.fixture
async def database(backend: Backend) -> AsyncIterator[tuple[str, str]]:
    assert backend.uri is not None
    name = f"bt_race_{uuid.uuid4().hex[:10]}"
    client = await connect(backend.uri, name)
    try:
        yield backend.uri, name
    finally:
        await client.drop_database(name)
        await close_client(client)


def expected(joined: Joined, leaves: dict[Any, Leaf]) -> State:
    def ends(links: list[Link[Leaf]]) -> list[State]:
        return [leaves[link.ref.id].state for link in links]

    first = ends([joined.first] if joined.first is not None else [])
    parts, mirrors = ends(joined.parts), ends(joined.mirrors)
    fatal = any(s is not State.FINISHED for s in first + parts) or bool(mirrors and State.FINISHED not in mirrors)
    return State.FAILED if fatal else State.FINISHED


def assert_not_early(joined: Joined, leaves: dict[Any, Leaf]) -> None:
    """A Joined that ran was claimed after every link it needed had ended."""
    started = joined.started_at
    assert started is not None

    def ended_before(link: Link[Leaf]) -> bool:
        leaf = leaves[link.ref.id]
        finished_at: datetime | None = leaf.finished_at
        return finished_at is not None and finished_at <= started

    needed = ([joined.first] if joined.first is not None else []) + joined.parts + joined.tolerant
    assert all(ended_before(link) for link in needed), f"Joined {joined.label} ran before its links ended"
    if joined.mirrors:
        assert any(ended_before(link) and leaves[link.ref.id].state is State.FINISHED for link in joined.mirrors), (
            f"Joined {joined.label} ran before any mirror finished"
        )


async def settled(timeout: float = WAIT) -> None:
    """Wait (bounded) until no Leaf or Joined is in flight."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        busy = 0
        for task_class in (Leaf, Joined):
            counts = await task_class.counts()
            busy += counts[State.CREATED] + counts[State.RUNNING]
        if busy == 0:
            return
        if loop.time() > deadline:
            blocked = {
                row["label"]: [entry["i"] for entry in row.get("dep_wait", [])]
                async for row in Joined.collection().find({"state": State.CREATED.value})
            }
            raise AssertionError(f"{busy} task(s) still in flight; blocked Joined (label: links waited on): {blocked}")
        await asyncio.sleep(0.05)


async def check_all() -> int:
    leaves = {leaf.id: leaf async for leaf in Leaf.find_all()}
    ran = 0
    async for joined in Joined.find_all():
        want = expected(joined, leaves)
        assert joined.state is want, f"Joined {joined.label}: {joined.state} != {want} ({joined.error})"
        if want is State.FINISHED:
            assert_not_early(joined, leaves)
            ran += 1
        else:
            assert joined.error is not None and "dependen" in joined.error
    return ran


# ------------------------------------------------------------------- tests


@pytest.mark.slow
async def test_dependencies_end_in_other_processes_while_dependents_are_pushed(
    database: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, name = database
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    register = Store.register_dependent

    async def slow_register(self: Store, *args: Any) -> Any:
        # Widen the window between reading the links' states and registering on them,
        # so the workers often end a dependency right inside it.
        await asyncio.sleep(rng.random() * 0.02)
        return await register(self, *args)

    monkeypatch.setattr(Store, "register_dependent", slow_register)
    stop = SPAWN.Event()
    ready = SPAWN.Barrier(4)
    workers = [SPAWN.Process(target=streaming_worker, args=(uri, name, seed + i, ready, stop)) for i in range(3)]
    for worker in workers:
        worker.start()
    try:
        await asyncio.to_thread(ready.wait, WAIT)
        leaves: list[Leaf] = []
        for group in range(12):
            # A few fresh leaves, then dependents on them (and on older ones) at once,
            # so links are pending, running or just ending while the dependent is pushed.
            fresh = [await Leaf(label=group * 10 + i, succeed=rng.random() < 0.85).push() for i in range(3)]
            leaves.extend(fresh)
            for i in range(rng.randint(1, 3)):
                pool = fresh + rng.sample(leaves, min(len(leaves), 2))
                await Joined(
                    label=group * 10 + 5 + i,
                    first=rng.choice(pool) if rng.random() < 0.5 else None,
                    parts=rng.sample(pool, rng.randint(0, 3)),
                    mirrors=rng.sample(pool, rng.randint(0, 3)),
                    tolerant=rng.sample(pool, rng.randint(0, 2)),
                ).push()
            await asyncio.sleep(rng.random() * 0.02)
        await settled()
    finally:
        stop.set()
        for worker in workers:
            worker.join(WAIT)
    assert all(worker.exitcode == 0 for worker in workers), f"worker failed (seed {seed})"
    assert await check_all() > 0, f"seed {seed}: no dependent ran at all"


async def test_all_of_dependencies_ending_at_the_same_moment(database: tuple[str, str]) -> None:
    uri, name = database
    width = 3
    # Per round, which leaves succeed: all; one fails while the others finish; all fail; all again.
    plans = [[True] * width, [True, False, True], [False] * width, [True] * width]
    start, done = SPAWN.Barrier(width + 1), SPAWN.Barrier(width + 1)
    together = SPAWN.Barrier(width)
    workers = [
        SPAWN.Process(target=burst_worker, args=(uri, name, len(plans), start, together, done)) for _ in range(width)
    ]
    for worker in workers:
        worker.start()
    try:
        for round_no, plan in enumerate(plans):
            leaves = [await Leaf(label=round_no * 10 + i, succeed=ok).push() for i, ok in enumerate(plan)]
            joined = [
                await Joined(label=round_no * 10 + 5, parts=leaves).push(),
                await Joined(label=round_no * 10 + 6, mirrors=leaves).push(),
                await Joined(label=round_no * 10 + 7, tolerant=leaves).push(),
            ]
            await asyncio.to_thread(start.wait, WAIT)
            await asyncio.to_thread(done.wait, WAIT)
            states = [(await Joined.get(j.id)).state for j in joined]  # type: ignore[union-attr]
            ready = [State.CREATED, State.CREATED, State.CREATED]
            if all(plan):
                assert states == ready, f"round {round_no}: {states}"
            elif any(plan):
                assert states == [State.FAILED, State.CREATED, State.CREATED], f"round {round_no}: {states}"
            else:
                assert states == [State.FAILED, State.FAILED, State.CREATED], f"round {round_no}: {states}"
            runnable = [j for j, s in zip(joined, states, strict=True) if s is State.CREATED]
            for _ in runnable:
                task = await Joined.pop()
                assert task is not None, f"round {round_no}: a ready dependent was not released"
                await task.finish()
            assert await Joined.pop() is None
    finally:
        for worker in workers:
            worker.join(WAIT)
            if worker.is_alive():
                worker.kill()
    assert all(worker.exitcode == 0 for worker in workers)
    assert await check_all() == 9
