"""The dependency repair sweep covers every parked task, not only the first batch.

``check_dependencies()`` reads parked dependents ``RECONCILE_BATCH`` at a time; repeated
calls must make progress through the whole set, so a dependent whose dependency was
deleted is always failed eventually, however many parked tasks sit ahead of it.
"""

from __future__ import annotations

from typing import Any

import pytest
from beanie import Link

from beanie_tasks import DependencyType, State, Task, dependencies, depends_on

BATCH = 3


class SweepParent(Task):
    n: int = 0


class SweepChild(Task):
    n: int = 0
    parent: Link[SweepParent] = depends_on(DependencyType.DIRECT)


@pytest.fixture(autouse=True)
async def models(init_tasks: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dependencies, "RECONCILE_BATCH", BATCH)
    await init_tasks(SweepParent, SweepChild)


async def children_states() -> dict[int, tuple[State, str | None]]:
    return {child.n: (child.state, child.error) async for child in SweepChild.find_all()}


async def sweep_until_all_failed(calls: int) -> dict[int, tuple[State, str | None]]:
    states = await children_states()
    for _ in range(calls):
        await SweepChild.check_dependencies()
        states = await children_states()
        if all(state is State.FAILED for state, _ in states.values()):
            break
    return states


async def test_repeated_sweeps_fail_every_child_whose_parent_was_deleted() -> None:
    """10 parked children whose parents were deleted from the raw collection: at most 10 calls of
    check_dependencies() (batch of 3) leave every one FAILED with a reason naming the deletion."""
    for n in range(10):
        parent = await SweepParent(n=n).push()
        await SweepChild(n=n, parent=parent).push()
    await SweepParent.collection().delete_many({})
    states = await sweep_until_all_failed(10)
    stuck = {n: state.value for n, (state, _) in states.items() if state is not State.FAILED}
    assert not stuck, f"children never failed after 10 sweeps: {stuck}"
    for n, (_, error) in states.items():
        assert error is not None and "deleted" in error, (n, error)


async def test_sweeps_get_past_a_batch_of_healthy_parked_children() -> None:
    """Parked children whose parents are alive and registered fill the first batches: the sweep must still
    reach the children behind them whose parents were deleted, and leave the healthy ones parked."""
    kept = [await SweepParent(n=n).push() for n in range(BATCH + 1)]
    for parent in kept:
        await SweepChild(n=parent.n, parent=parent).push()
    doomed = [await SweepParent(n=100 + n).push() for n in range(6)]
    for parent in doomed:
        await SweepChild(n=parent.n, parent=parent).push()
    await SweepParent.collection().delete_many({"_id": {"$in": [p.id for p in doomed]}})
    for _ in range(10):
        await SweepChild.check_dependencies()
    states = await children_states()
    stuck = {n: state.value for n, (state, _) in states.items() if n >= 100 and state is not State.FAILED}
    assert not stuck, f"children of deleted parents never failed after 10 sweeps: {stuck}"
    for n in range(100, 106):
        error = states[n][1]
        assert error is not None and "deleted" in error, (n, error)
    for parent in kept:
        assert states[parent.n][0] is State.CREATED, "a child of a live parent stays parked"
    assert await SweepChild.pop() is None
