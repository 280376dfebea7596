"""push_many: one unordered insert_many per chunk, one outcome per task, push()'s semantics for each."""

from __future__ import annotations

from typing import Any

import pytest
from beanie import Indexed, Link
from bson import ObjectId

from beanie_tasks import DependencyType, PushOutcome, PushStatus, State, Task, depends_on
from beanie_tasks.store import Store
from beanie_tasks.task import FAR_FUTURE
from tests.conftest import Backend


class Mail(Task):
    to: str
    body: str = ""


class Resize(Task):
    src: str


class Publish(Task):
    resize: Link[Resize] = depends_on(DependencyType.DIRECT)


class Account(Task):
    email: Indexed(str, unique=True)  # type: ignore[valid-type]  # an index of the app's own


class Tenanted(Task):
    tenant: str

    class TaskSettings:
        partition_by = "tenant"


class Step(Task):
    previous: Link[Step] | None = depends_on(DependencyType.DIRECT, default=None)


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Mail, Resize, Publish, Step, Tenanted, Account)


def statuses(outcomes: list[PushOutcome[Any]]) -> list[str]:
    return [o.status.value for o in outcomes]


@pytest.mark.wire
async def test_a_thousand_independent_tasks_cost_one_insert(backend: Backend) -> None:
    tasks = [Mail(to=f"user{i}@example.com") for i in range(1000)]
    backend.counter.reset()
    outcomes = await Mail.push_many(tasks)
    assert backend.counter.by_name() == {"insert": 1}, "at most 0.01 commands per task"
    assert all(o.status is PushStatus.PUSHED and o.stored is o.task for o in outcomes)
    assert len({t.id for t in tasks}) == 1000 and all(t.state is State.CREATED and t.run_at for t in tasks)
    assert await Mail.find_all().count() == 1000


@pytest.mark.wire
async def test_chunks_are_one_insert_each(backend: Backend) -> None:
    backend.counter.reset()
    outcomes = await Mail.push_many([Mail(to=str(i)) for i in range(5)], chunk_size=2)
    assert backend.counter.by_name() == {"insert": 3}
    assert statuses(outcomes) == ["pushed"] * 5


async def test_push_many_stores_what_push_stores() -> None:
    single = await Mail(to="a@example.com", dedupe_key="a").push()
    [outcome] = await Mail.push_many([Mail(to="b@example.com", dedupe_key="b")])
    one = await Mail.collection().find_one({"_id": single.id})
    many = await Mail.collection().find_one({"_id": outcome.id})
    assert one is not None and many is not None
    assert sorted(one) == sorted(many) and many["dedupe_slot"] == "b"
    for name in ("state", "attempts", "max_attempts", "priority", "result", "error"):
        assert one[name] == many[name], name


async def test_each_task_gets_its_own_outcome_and_the_others_are_stored() -> None:
    holder = await Mail(to="held@example.com", dedupe_key="daily").push()
    invalid = Mail(to="x@example.com")
    invalid.to = 12  # type: ignore[assignment]  # not validated on assignment; push_many validates
    batch = [
        Mail(to="first@example.com"),
        invalid,
        Mail(to="again@example.com", dedupe_key="daily"),  # in flight already
        Mail(to="one@example.com", dedupe_key="weekly"),
        Mail(to="two@example.com", dedupe_key="weekly"),  # clashes with the task just before it
        Mail(to="last@example.com"),
    ]
    outcomes = await Mail.push_many(batch)
    assert statuses(outcomes) == ["pushed", "rejected", "duplicate", "pushed", "duplicate", "pushed"]
    assert [o.task for o in outcomes] == batch
    assert "validation error" in (outcomes[1].error or "") and "to" in (outcomes[1].error or "")
    assert outcomes[1].stored is None and outcomes[1].id is None and invalid.id is None
    assert outcomes[2].id == holder.id and batch[2].id is None, "the duplicate itself is not stored"
    assert outcomes[4].id == batch[3].id
    assert isinstance(outcomes[4].stored, Mail) and outcomes[4].stored.to == "one@example.com"
    assert await Mail.find_all().count() == 4  # the holder and the three new ones


async def test_tasks_already_pushed_or_of_another_class_are_rejected() -> None:
    pushed = await Mail(to="a").push()
    outcomes = await Mail.push_many([pushed, Resize(src="x"), Mail(to="b")])  # type: ignore[list-item]
    assert statuses(outcomes) == ["rejected", "rejected", "pushed"]
    assert "already pushed" in (outcomes[0].error or "") and "is not a Mail" in (outcomes[1].error or "")


async def test_pushing_again_after_a_lost_reply_stores_each_task_once() -> None:
    task = Mail(to="a")
    [first] = await Mail.push_many([task])
    chosen = task.id
    task.id = None  # as if the reply had been lost: the caller pushes the same object again
    [again] = await Mail.push_many([task])
    assert first.pushed and again.pushed and task.id == chosen
    assert await Mail.find_all().count() == 1


async def test_a_document_over_the_size_limit_is_rejected_alone() -> None:
    outcomes = await Mail.push_many([Mail(to="a"), Mail(to="big", body="x" * (17 * 1024 * 1024)), Mail(to="b")])
    assert statuses(outcomes) == ["pushed", "rejected", "pushed"]
    assert "16 MB" in (outcomes[1].error or "")
    assert sorted(m.to for m in await Mail.find_all().to_list()) == ["a", "b"]


async def test_links_to_existing_tasks_park_until_they_finish() -> None:
    done, waiting = await Resize(src="done").push(), await Resize(src="waiting").push()
    claimed = await Resize.pop()
    assert claimed is not None and claimed.id == done.id
    await claimed.finish()
    outcomes = await Publish.push_many([Publish(resize=done), Publish(resize=waiting)])  # type: ignore[arg-type]
    ready, parked = (o.stored for o in outcomes)
    assert ready is not None and parked is not None
    assert ready.run_at != FAR_FUTURE and parked.run_at == FAR_FUTURE
    first = await Publish.pop()
    assert first is not None and first.id == ready.id and await Publish.pop() is None
    claimed = await Resize.pop()
    assert claimed is not None
    await claimed.finish()
    released = await Publish.pop()
    assert released is not None and released.id == parked.id


async def test_tasks_of_one_call_may_link_each_other_across_classes() -> None:
    resize = Resize(src="a.png")
    publish = Publish(resize=resize)  # type: ignore[arg-type]
    outcomes = await Task.push_many([publish, resize])  # the dependency is stored first, whatever the order
    assert statuses(outcomes) == ["pushed", "pushed"]
    assert publish.run_at == FAR_FUTURE
    assert await Publish.pop() is None
    claimed = await Resize.pop()
    assert claimed is not None and claimed.id == resize.id
    await claimed.finish()
    released = await Publish.pop()
    assert released is not None and released.id == publish.id


async def test_a_link_to_a_task_of_the_call_that_was_not_pushed_is_rejected() -> None:
    bad = Resize(src="x")
    bad.src = None  # type: ignore[assignment]
    chain_start = Step()
    cycle_a, cycle_b = Step(), Step()
    cycle_b.previous = cycle_a  # type: ignore[assignment]
    cycle_a.previous = cycle_b  # type: ignore[assignment]
    outcomes = await Task.push_many(
        [bad, Publish(resize=bad), chain_start, Step(previous=chain_start), cycle_a, cycle_b]  # type: ignore[arg-type]
    )
    assert statuses(outcomes) == ["rejected", "rejected", "pushed", "pushed", "rejected", "rejected"]
    assert "which was not pushed (rejected)" in (outcomes[1].error or "")
    assert "cycle" in (outcomes[4].error or "") and "cycle" in (outcomes[5].error or "")
    assert await Publish.find_all().count() == 0 and await Step.find_all().count() == 2


async def test_a_link_to_a_missing_task_is_rejected_like_push() -> None:
    ghost = Resize(src="never pushed")
    await ghost.push()
    await ghost.delete()
    outcomes = await Publish.push_many([Publish(resize=ghost), Publish(resize=await Resize(src="ok").push())])  # type: ignore[arg-type]
    assert statuses(outcomes) == ["rejected", "pushed"]
    assert "does not exist" in (outcomes[0].error or "")


async def test_the_same_object_twice_is_pushed_once() -> None:
    task = Mail(to="a")
    outcomes = await Mail.push_many([task, task])
    assert statuses(outcomes) == ["pushed", "rejected"] and "appears earlier" in (outcomes[1].error or "")
    assert await Mail.find_all().count() == 1


async def test_a_malformed_twin_is_reported_by_id_and_the_others_are_pushed() -> None:
    hostile = {"_id": ObjectId(), "state": "CREATED", "to": 12, "dedupe_key": "evil", "dedupe_slot": "evil"}
    await Mail.collection().insert_one(hostile)
    outcomes = await Mail.push_many([Mail(to="a", dedupe_key="evil"), Mail(to="b")])
    assert statuses(outcomes) == ["duplicate", "pushed"]
    assert outcomes[0].id == hostile["_id"] and "does not validate" in (outcomes[0].error or "")


@pytest.mark.wire  # mongomock's dedupe index cannot be scoped to a partition (see driver.py)
async def test_dedupe_keys_are_per_partition() -> None:
    held = await Tenanted(tenant="acme", dedupe_key="nightly").push()
    outcomes = await Tenanted.push_many(
        [Tenanted(tenant="acme", dedupe_key="nightly"), Tenanted(tenant="globex", dedupe_key="nightly")]
    )
    assert statuses(outcomes) == ["duplicate", "pushed"] and outcomes[0].id == held.id
    missing = Tenanted(tenant="x")
    missing.tenant = ""
    [refused] = await Tenanted.push_many([missing])
    assert refused.status is PushStatus.REJECTED and "partition_by" in (refused.error or "")


@pytest.mark.wire
async def test_links_cost_one_read_and_one_registration_per_chunk(backend: Backend) -> None:
    parents = [await Resize(src=f"{i}.png").push() for i in range(5)]
    children = [Publish(resize=parents[i % 5]) for i in range(50)]  # type: ignore[arg-type]
    backend.counter.reset()
    outcomes = await Publish.push_many(children)
    assert backend.counter.by_name() == {"find": 1, "insert": 1, "update": 1}
    assert all(o.pushed for o in outcomes) and all(c.run_at == FAR_FUTURE for c in children)
    for _ in parents:
        claimed = await Resize.pop()
        assert claimed is not None
        await claimed.finish()
    assert await Publish.find({"run_at": {"$lt": FAR_FUTURE}}).count() == 50


async def test_a_dependency_that_ends_before_registration_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    """The race push() handles: the dependency ends between the read and the registration."""
    racing, steady = await Resize(src="race.png").push(), await Resize(src="steady.png").push()
    original = Store.states_of
    reads = 0

    async def finish_after_first_read(self: Store, name: str, ids: Any) -> Any:
        nonlocal reads
        reads += 1
        found = await original(self, name, ids)
        if reads == 1:  # the read saw it CREATED; it finishes before the registration
            await Resize.collection().update_one(
                {"_id": racing.id}, {"$set": {"state": "FINISHED"}, "$unset": {"dedupe_slot": ""}}
            )
        return found

    monkeypatch.setattr(Store, "states_of", finish_after_first_read)
    first, second = Publish(resize=racing), Publish(resize=steady)  # type: ignore[arg-type]
    outcomes = await Publish.push_many([first, second])
    assert statuses(outcomes) == ["pushed", "pushed"]
    assert first.run_at != FAR_FUTURE, "released at once, not left to the repair sweep"
    assert second.run_at == FAR_FUTURE


async def test_a_clash_on_an_index_of_the_app_is_rejected_alone() -> None:
    outcomes = await Account.push_many([Account(email="a@x"), Account(email="a@x"), Account(email="b@x")])
    assert statuses(outcomes) == ["pushed", "rejected", "pushed"]
    assert "could not push Account" in (outcomes[1].error or "") and "uplicate" in (outcomes[1].error or "")
    assert await Account.find_all().count() == 2
