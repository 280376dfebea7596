"""A dependent parked on its dependencies stays parked whatever is done to it.

Failing a parked task that was never claimed (an attempt is spent, a retry is due) or
requeueing failed tasks must never make a dependent claimable before its dependencies
are met: it would run without the results it links to.
"""

from __future__ import annotations

from typing import Any

import pytest
from beanie import Link

from beanie_tasks import Backoff, DependencyType, State, Task, depends_on
from beanie_tasks.testing import eventually


class ParkedParent(Task):
    n: int = 0


class ParkedChild(Task):
    class TaskSettings:
        max_attempts = 3
        backoff = Backoff(base=0.0, jitter=0.0)  # a retry is due at once: only the links can hold it back

    parent: Link[ParkedParent] = depends_on(DependencyType.DIRECT)


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(ParkedParent, ParkedChild)


async def stored(task: Task) -> Task:
    current = await type(task).get(task.id)
    assert current is not None
    return current


async def test_failing_an_unclaimed_parked_child_keeps_it_parked() -> None:
    """child.fail("boom") on a parked, never-claimed Child (attempts remain) does not release it: pop() is
    None while its Parent is CREATED, then RUNNING; once the Parent finishes, the Child becomes claimable."""
    parent = await ParkedParent().push()
    child = await ParkedChild(parent=parent).push()
    assert await ParkedChild.pop() is None
    fetched = await ParkedChild.get(child.id)
    assert fetched is not None
    await fetched.fail("boom")
    assert (await stored(fetched)).state is State.CREATED, "attempts remain: it is still a live task"
    early = await ParkedChild.pop()
    assert early is None, f"the Child was claimed while its Parent is {(await stored(parent)).state.value}"
    claimed_parent = await ParkedParent.pop()
    assert claimed_parent is not None and claimed_parent.id == parent.id
    assert await ParkedChild.pop() is None, "a RUNNING Parent is not met either"
    await claimed_parent.finish()
    released = await eventually(ParkedChild.pop, timeout=5)
    assert released.id == child.id


async def test_requeue_failed_does_not_release_a_child_failed_while_parked() -> None:
    """A parked Child failed for good (retry=False) before its Parent ran: requeue_failed() must not make
    it claimable while the Parent is still CREATED."""
    parent = await ParkedParent().push()
    child = await ParkedChild(parent=parent).push()
    fetched = await ParkedChild.get(child.id)
    assert fetched is not None
    await fetched.fail("boom", retry=False)
    assert (await stored(fetched)).state is State.FAILED
    await ParkedChild.requeue_failed()
    early = await ParkedChild.pop()
    assert early is None, f"requeue_failed released a Child whose Parent is {(await stored(parent)).state.value}"
    assert (await stored(parent)).state is State.CREATED


async def test_requeue_failed_leaves_a_child_failed_by_its_dependency_failed() -> None:
    """A Child FAILED because its Parent failed is not requeued: it stays FAILED and unclaimable."""
    parent = await ParkedParent().push()
    child = await ParkedChild(parent=parent).push()
    claimed_parent = await ParkedParent.pop()
    assert claimed_parent is not None
    await claimed_parent.fail("parent broke", retry=False)
    before = await stored(child)
    assert before.state is State.FAILED and before.error is not None and "parent broke" in before.error
    await ParkedChild.requeue_failed()
    assert await ParkedChild.pop() is None
    after = await stored(child)
    assert after.state is State.FAILED and after.error == before.error and after.attempts == before.attempts
