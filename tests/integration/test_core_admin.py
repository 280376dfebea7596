"""Admin helpers: counts per state, requeue_failed(), purge(states)."""

from __future__ import annotations

from typing import Any

import pytest

from beanie_tasks import State, Task


class Chore(Task):
    name: str = ""


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Chore)


async def one_of_each() -> None:
    """Two CREATED, one RUNNING, one FINISHED, two FAILED, one CANCELLED."""
    for name in ("finished", "failed1", "failed2", "running", "cancelled", "created1", "created2"):
        await Chore(name=name).push()
    for outcome in ("finished", "failed1", "failed2", "running"):
        task = await Chore.pop()
        assert task is not None and task.name == outcome
        if outcome == "finished":
            await task.finish()
        elif outcome.startswith("failed"):
            await task.fail("broken")
    cancelled = await Chore.find_one(Chore.name == "cancelled")
    assert cancelled is not None and await cancelled.cancel()


async def test_counts_cover_every_state() -> None:
    assert await Chore.counts() == dict.fromkeys(State, 0)
    await one_of_each()
    assert await Chore.counts() == {
        State.CREATED: 2,
        State.RUNNING: 1,
        State.FINISHED: 1,
        State.FAILED: 2,
        State.CANCELLED: 1,
    }


async def test_requeue_failed_gives_fresh_attempts() -> None:
    await one_of_each()
    assert await Chore.requeue_failed() == 2
    counts = await Chore.counts()
    assert counts[State.FAILED] == 0 and counts[State.CREATED] == 4
    requeued = await Chore.find_one(Chore.name == "failed1")
    assert requeued is not None and requeued.state is State.CREATED
    assert requeued.attempts == 0 and requeued.finished_at is None and requeued.expires_at is None
    assert requeued.lease_token is None
    await requeued.finish()  # as a never-popped task, it can be settled directly
    assert await Chore.requeue_failed() == 0


async def test_requeue_failed_skips_a_task_whose_key_is_in_flight_again() -> None:
    old = await Chore(name="old", dedupe_key="k").push()
    await old.fail("broken")
    free = await Chore(name="free", dedupe_key="other").push()
    await free.fail("broken")
    newer = await Chore(name="newer", dedupe_key="k").push()
    assert newer.id != old.id
    assert await Chore.requeue_failed() == 1
    assert (await Chore.get(old.id)).state is State.FAILED  # type: ignore[union-attr]
    back = await Chore.get(free.id)
    assert back is not None and back.state is State.CREATED
    assert (await Chore(name="dup", dedupe_key="other").push()).id == free.id, "the requeued task holds its key again"


async def test_purge_deletes_only_the_named_states() -> None:
    await one_of_each()
    assert await Chore.purge([State.FINISHED, "CANCELLED"]) == 2
    counts = await Chore.counts()
    assert counts[State.FINISHED] == 0 and counts[State.CANCELLED] == 0 and counts[State.FAILED] == 2


async def test_purge_refuses_in_flight_states_without_force() -> None:
    await one_of_each()
    with pytest.raises(ValueError, match="in-flight"):
        await Chore.purge([State.CREATED])
    with pytest.raises(ValueError, match="in-flight"):
        await Chore.purge([State.FAILED, State.RUNNING])
    assert sum((await Chore.counts()).values()) == 7, "nothing was deleted"
    assert await Chore.purge([State.CREATED, State.RUNNING], force=True) == 3


async def test_purge_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        await Chore.purge([])
    with pytest.raises(ValueError):
        await Chore.purge(["DONE"])
