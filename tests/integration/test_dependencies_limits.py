"""Dependency links have a stated limit, refused at push, and fan-out below it just works.

A dependent's link field holds at most 1,000 links: one with more is refused by
``push()`` with a ``PushError`` that states the limit, before anything is written (the
dependent is not stored, and no dependency records it). One Parent with a few hundred
direct dependents releases every one of them when it finishes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from beanie import Link

from beanie_tasks import DependencyType, PushError, State, Task, depends_on

LIMIT = 1000
FAN_OUT = 300


class LimitParent(Task):
    n: int = 0


class Gather(Task):
    parts: list[Link[LimitParent]] = depends_on(DependencyType.ALL_OF, default_factory=list)


class FanChild(Task):
    n: int = 0
    parent: Link[LimitParent] = depends_on(DependencyType.DIRECT)


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(LimitParent, Gather, FanChild)


async def push_parents(count: int) -> list[LimitParent]:
    """Push ``count`` parents, a few at a time (each is a real push())."""
    pushed: list[LimitParent] = []
    for start in range(0, count, 50):
        pushed += await asyncio.gather(*(LimitParent(n=n).push() for n in range(start, min(start + 50, count))))
    return pushed


@pytest.mark.timeout(120)
async def test_a_field_with_more_than_1000_links_is_refused_at_push() -> None:
    """An ALL_OF field linking 1,001 pushed tasks: push() raises PushError stating the 1,000 limit, nothing written."""
    parents = await push_parents(LIMIT + 1)
    with pytest.raises(PushError) as raised:
        await Gather(parts=parents).push()
    message = str(raised.value)
    assert "1000" in message or "1,000" in message, message
    assert await Gather.collection().count_documents({}) == 0, "the refused dependent was stored"
    registered = await LimitParent.collection().count_documents(
        {"$or": [{"dependents.0": {"$exists": True}}, {"dependents_pending": True}]}
    )
    assert registered == 0, f"{registered} dependencies recorded the refused dependent"
    exactly = await Gather(parts=parents[:LIMIT]).push()  # the limit itself is allowed
    assert exactly.id is not None and exactly.state is State.CREATED


@pytest.mark.timeout(120)
async def test_300_direct_dependents_of_one_parent_are_all_released() -> None:
    """300 FanChild tasks with a DIRECT link to one Parent: after the Parent finishes, all 300 can be popped."""
    loop = asyncio.get_running_loop()
    parent = await LimitParent(n=-1).push()
    for start in range(0, FAN_OUT, 20):
        await asyncio.gather(*(FanChild(n=n, parent=parent).push() for n in range(start, start + 20)))
    assert await FanChild.pop() is None
    claimed = await LimitParent.pop()
    assert claimed is not None and claimed.id == parent.id
    await claimed.finish()
    deadline = loop.time() + 60
    popped: set[int] = set()
    while len(popped) < FAN_OUT and loop.time() < deadline:
        child = await FanChild.pop()
        if child is None:
            await asyncio.sleep(0.05)
            continue
        popped.add(child.n)
    parked = await FanChild.collection().count_documents({"state": State.CREATED.value})
    assert len(popped) == FAN_OUT, f"only {len(popped)} of {FAN_OUT} dependents were released ({parked} still parked)"
