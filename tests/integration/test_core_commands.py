"""The hot path is cheap: one findAndModify to claim, one to finish, served by bt_claim."""

from __future__ import annotations

from typing import Any

import pytest
from pymongo import ASCENDING, DESCENDING

from beanie_tasks import Task
from beanie_tasks.store import CLAIM_INDEX, CLAIM_SORT
from beanie_tasks.task import utcnow
from tests.conftest import Backend


class Work(Task):
    n: int = 0


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Work)


@pytest.mark.wire
async def test_pop_and_finish_are_one_find_and_modify_each(backend: Backend) -> None:
    await Work().push()
    backend.counter.reset()
    task = await Work.pop()
    assert task is not None
    assert backend.counter.by_name() == {"findAndModify": 1}
    backend.counter.reset()
    await task.finish()
    # The finish returns the task's dependents flag in the same command, so whether
    # dependents are told depends on what is stored, not on which classes this process imported.
    assert backend.counter.by_name() == {"findAndModify": 1}
    returned = dict(backend.counter.last["findAndModify"]["fields"])
    returned.pop("_id", None)  # Motor names it explicitly
    assert returned == {"dependents_pending": 1, "dependents_in": 1}


@pytest.mark.wire
async def test_empty_pop_is_one_find_and_modify(backend: Backend) -> None:
    backend.counter.reset()
    assert await Work.pop() is None
    assert backend.counter.by_name() == {"findAndModify": 1}


async def test_claim_index_is_in_equality_sort_range_order() -> None:
    indexes = await Work.collection().index_information()
    keys = [(name, int(direction)) for name, direction in indexes["bt_claim"]["key"]]
    claim = Work.claim_filter(utcnow())
    # "state.0" only keeps an array state out (it exists on no string); it is checked on the fetched document.
    assert claim.pop("state.0") == {"$exists": False}
    equality = [(field, ASCENDING) for field, condition in claim.items() if not isinstance(condition, dict)]
    ranged = [field for field, condition in claim.items() if isinstance(condition, dict)]
    assert equality == [("state", ASCENDING)]
    assert keys == equality + [(field, direction) for field, direction in CLAIM_SORT]
    assert ranged == ["run_at"] and ("run_at", ASCENDING) in CLAIM_SORT
    assert CLAIM_SORT[0] == ("priority", DESCENDING)


def plan_stages(plan: dict[str, Any]) -> list[tuple[str, str | None]]:
    stages = []
    while plan:
        stages.append((plan.get("stage", ""), plan.get("indexName")))
        plan = plan.get("inputStage") or {}
    return stages


@pytest.mark.wire
async def test_claim_plan_is_an_index_scan_of_bt_claim(backend: Backend) -> None:
    for n in range(20):
        await Work(n=n).push()
    for _ in range(5):
        task = await Work.pop()
        assert task is not None
        await task.finish()
    backend.counter.reset()
    await Work.pop()
    # pop() pins its plan to the claim index, so no server's planner can choose otherwise.
    assert backend.counter.last["findAndModify"].get("hint") == CLAIM_INDEX
    cursor = Work.collection().find(Work.claim_filter(utcnow())).sort(CLAIM_SORT).hint(CLAIM_INDEX).limit(1)
    plan = (await cursor.explain())["queryPlanner"]["winningPlan"]
    stages = plan_stages(plan)
    assert ("IXSCAN", "bt_claim") in stages, stages
    if backend.name == "secantus":
        # SecantusDB's planner re-sorts index output in memory; MongoDB takes the order from
        # the index (equality, sort, range), which the strict check below holds it to.
        return
    assert all(stage != "SORT" for stage, _ in stages), f"the sort must come from the index: {stages}"
