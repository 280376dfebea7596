"""Dependency links have a stated limit, refused at push, and fan-out below it just works.

A dependent waits for at most ``MAX_LINKS_PER_TASK`` (1,000) tasks: more is refused by
``push()`` with a ``PushError`` that states the limit, before anything is written (the
dependent is not stored, and no dependency records it). One Parent with many direct
dependents releases every one of them when it finishes, page by page. The tests lower the
limit and the page size so the collections stay small; the full sizes are measured in
``bench/`` (fan-out of 10,000, fan-in of 1,000).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from beanie import Link

from beanie_tasks import DependencyType, PushError, State, Task, dependencies, depends_on, store

LIMIT = 20
FAN_OUT = 60
DEFAULT_LIMIT = dependencies.MAX_LINKS_PER_TASK  # read before the fixture lowers it


class LimitParent(Task):
    n: int = 0


class Gather(Task):
    parts: list[Link[LimitParent]] = depends_on(DependencyType.ALL_OF, default_factory=list)


class FanChild(Task):
    n: int = 0
    parent: Link[LimitParent] = depends_on(DependencyType.DIRECT)


@pytest.fixture(autouse=True)
async def models(init_tasks: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dependencies, "MAX_LINKS_PER_TASK", LIMIT)
    monkeypatch.setattr(store, "PAGE", 25)  # a notification reads its dependents in pages of this size
    await init_tasks(LimitParent, Gather, FanChild)


def test_the_default_limit_is_1000() -> None:
    """The documented default: a dependent may wait for 1,000 tasks."""
    assert DEFAULT_LIMIT == 1000


async def push_parents(count: int) -> list[LimitParent]:
    """Push ``count`` parents, a few at a time (each is a real push())."""
    pushed: list[LimitParent] = []
    for start in range(0, count, 50):
        pushed += await asyncio.gather(*(LimitParent(n=n).push() for n in range(start, min(start + 50, count))))
    return pushed


async def test_a_field_with_more_links_than_the_limit_is_refused_at_push() -> None:
    """An ALL_OF field linking one task more than the limit: push() raises PushError stating it, nothing written."""
    parents = await push_parents(LIMIT + 1)
    with pytest.raises(PushError) as raised:
        await Gather(parts=parents).push()
    message = str(raised.value)
    assert f"at most {LIMIT}" in message, message
    assert await Gather.collection().count_documents({}) == 0, "the refused dependent was stored"
    registered = await LimitParent.collection().count_documents(
        {"$or": [{"dependents_in.0": {"$exists": True}}, {"dependents_pending": True}]}
    )
    assert registered == 0, f"{registered} dependencies recorded the refused dependent"
    exactly = await Gather(parts=parents[:LIMIT]).push()  # the limit itself is allowed
    assert exactly.id is not None and exactly.state is State.CREATED


async def test_every_direct_dependent_of_one_parent_is_released_page_by_page() -> None:
    """60 FanChild tasks with a DIRECT link to one Parent (three pages of 25): after it finishes, all can be popped."""
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
