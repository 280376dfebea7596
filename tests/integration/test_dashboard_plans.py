"""The dashboard's task lists are keyset pages served by an index of ``store``: the shape on every backend,
the plan (no collection scan, no in-memory sort) on a real MongoDB."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from bson import ObjectId
from pymongo import ASCENDING

from beanie_tasks import Task
from beanie_tasks.store import LIST_SORTS
from tests.conftest import Backend


class Listed(Task):
    n: int = 0


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Listed)


AFTER = {
    "_id": ObjectId(),
    "priority": 2,
    "run_at": datetime.now(timezone.utc),
    "finished_at": datetime.now(timezone.utc),
}


def state_for(sort_name: str) -> str:
    return "FINISHED" if sort_name == "ended" else "CREATED"


def declared_keys(index_name: str) -> list[tuple[str, int]]:
    if index_name == "_id_":
        return [("_id", ASCENDING)]
    for model in Listed.task_store().index_models():
        if model.document["name"] == index_name:
            return list(model.document["key"].items())
    raise AssertionError(f"store declares no index {index_name}")


@pytest.mark.parametrize("sort_name", sorted(LIST_SORTS))
async def test_each_order_is_the_tail_of_a_declared_index(backend: Backend, sort_name: str) -> None:
    task_store = Listed.task_store()
    selector = task_store.list_filter(state=state_for(sort_name))
    query, sort, hint = task_store.list_query(selector, sort_name, {k: AFTER[k] for k, _ in LIST_SORTS[sort_name][0]})
    index_name = LIST_SORTS[sort_name][1]
    if not backend.is_mock:
        assert hint == {"hint": index_name}
    keys = declared_keys(index_name)
    equality = [name for name, _ in keys if name in selector and not isinstance(selector[name], dict)]
    tail = keys[len(equality) :]
    assert [name for name, _ in keys[: len(equality)]] == equality, "the filter's equalities lead the index"
    flipped = [(name, -direction) for name, direction in tail]
    assert sort in (tail, flipped), (sort, keys)
    assert "$or" in str(query), "the position is carried in the filter"


def stages(plan: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(plan, dict):
        if "stage" in plan:
            found.add(plan["stage"])
        for value in plan.values():
            found |= stages(value)
    elif isinstance(plan, list):
        for item in plan:
            found |= stages(item)
    return found


@pytest.mark.parametrize("sort_name", sorted(LIST_SORTS))
async def test_explain_shows_no_collection_scan(backend: Backend, sort_name: str) -> None:
    if backend.name != "mongodb":
        pytest.skip("explain is meaningful on a real MongoDB only: set MONGODB_URI to run this test")
    for n in range(20):
        await Listed(n=n).push()
    task_store = Listed.task_store()
    selector = task_store.list_filter(state=state_for(sort_name))
    for after in (None, {k: AFTER[k] for k, _ in LIST_SORTS[sort_name][0]}):
        plan = await task_store.explain_list(selector, sort_name, after)
        used = stages(plan["queryPlanner"]["winningPlan"])
        assert "COLLSCAN" not in used and "SORT" not in used, (sort_name, used)
        assert "IXSCAN" in used or "EXPRESS_IXSCAN" in used
