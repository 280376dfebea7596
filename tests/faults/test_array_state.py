"""An array ``state`` is never a state: such a document is never claimed, and the sweep sets it aside.

MongoDB's equality match also matches an array that contains the value, so a claim filter of
``{state: "CREATED"}`` alone would claim ``{state: ["CREATED"]}``. The claim must match the
string only; ``set_aside_unclaimable()`` marks the array-state document FAILED.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from bson import ObjectId

from beanie_tasks import State, Task


class Arrayed(Task):
    n: int = 0

    class Settings:
        name = "array_state"


@pytest.fixture(autouse=True)
async def models(init_tasks: Callable[..., Awaitable[None]]) -> None:
    await init_tasks(Arrayed)


async def insert_array_state() -> Any:
    """A due, high-priority document of the class whose state is ``["CREATED"]``."""
    template_task = await Arrayed(n=0).push()
    template = await Arrayed.collection().find_one({"_id": template_task.id})
    assert template is not None
    await Arrayed.collection().delete_one({"_id": template_task.id})
    past = datetime.now(timezone.utc) - timedelta(minutes=5)
    document = dict(template) | {"_id": ObjectId(), "state": [State.CREATED.value], "run_at": past, "priority": 50}
    await Arrayed.collection().insert_one(document)
    return document["_id"]


async def test_array_state_document_is_never_claimed() -> None:
    """pop() skips a document whose state is ``["CREATED"]`` and claims the ordinary task, then nothing."""
    array_id = await insert_array_state()
    ordinary = await Arrayed(n=1).push()
    first = await Arrayed.pop()
    assert first is not None and first.id == ordinary.id, f"pop() claimed {first and first.id}, not {ordinary.id}"
    assert await Arrayed.pop() is None
    untouched = await Arrayed.collection().find_one({"_id": array_id})
    assert untouched is not None and untouched["state"] == [State.CREATED.value] and untouched["attempts"] == 0


async def test_array_state_document_is_set_aside_by_the_sweep() -> None:
    """``set_aside_unclaimable()`` marks an unclaimed array-state document FAILED, with the reason."""
    array_id = await insert_array_state()
    ordinary = await Arrayed(n=1).push()
    claimed = await Arrayed.pop()
    assert claimed is not None and claimed.id == ordinary.id, "the claim left the array-state document alone"
    assert await Arrayed.set_aside_unclaimable() == 1
    after = await Arrayed.collection().find_one({"_id": array_id})
    assert after is not None and after["state"] == State.FAILED.value
    assert "state" in (after.get("error") or "")
