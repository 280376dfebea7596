"""Maintenance rounds: one probe per database finds what needs repair, however many classes a worker runs.

An idle round costs one command for one class or many, in one collection or several.
Repairs go only to classes the probe named, each under its own class's settings: a
subclass's expired lease is recovered under the subclass's ``max_redeliveries``, even
when the worker (or the caller) runs its parent. Expired leases, dependents a dying
finisher left behind, slots of tasks that stopped running and malformed documents are
all still repaired, and a refused probe falls back to repairing every class.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from beanie import Link
from pymongo.errors import OperationFailure

from beanie_tasks import DependencyType, State, Task, Worker, depends_on, driver, maintenance, store
from beanie_tasks.dependencies import declared_links
from beanie_tasks.limits import LIMITS_COLLECTION
from beanie_tasks.maintenance import Maintained
from beanie_tasks.task import utcnow
from beanie_tasks.testing import running
from tests.conftest import Backend

SHARED = "bt_maintenance_jobs"


class Job(Task):
    """The root of the classes sharing one collection."""

    class Settings:
        is_root = True
        name = SHARED

    class TaskSettings:
        recovery_interval = 1.0

    async def run(self) -> None:
        """Nothing."""


class KindA(Job):
    pass


class KindB(Job):
    pass


class KindC(Job):
    pass


class Fragile(Job):
    """A lost lease is final for this subclass, while its parent and siblings are delivered again."""

    class TaskSettings:
        max_redeliveries = 0


class Own1(Task):
    class Settings:
        name = "bt_maintenance_own1"

    async def run(self) -> None:
        """Nothing."""


class Own2(Task):
    class Settings:
        name = "bt_maintenance_own2"

    async def run(self) -> None:
        """Nothing."""


class Own3(Task):
    class Settings:
        name = "bt_maintenance_own3"

    async def run(self) -> None:
        """Nothing."""


class Own4(Task):
    class Settings:
        name = "bt_maintenance_own4"

    async def run(self) -> None:
        """Nothing."""


class Step(Task):
    async def run(self) -> None:
        """Nothing."""


class AfterStep(Task):
    step: Link[Step] = depends_on(DependencyType.DIRECT)

    async def run(self) -> None:
        """Nothing."""


class Capped(Task):
    class TaskSettings:
        key_concurrency = 1

    async def run(self) -> None:
        """Nothing."""


ALL = [Job, KindA, KindB, KindC, Fragile, Own1, Own2, Own3, Own4, Step, AfterStep, Capped]


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(*ALL)


def maintained(*classes: type[Task]) -> list[Maintained]:
    return [Maintained(c.task_store(), has_links=bool(declared_links(c))) for c in classes]


async def round_of(*classes: type[Task], sweep: bool = False) -> maintenance.Report:
    return await maintenance.maintain(maintained(*classes), who="test", sweep=sweep)


async def held_by_a_dead_worker(task_class: type[Task], **fields: Any) -> Task:
    """A task of ``task_class`` claimed by a worker that died: RUNNING, its lease expired."""
    pushed = await task_class(**fields).push()
    claimed = await task_class.pop(consumer_id="died")
    assert claimed is not None and claimed.id == pushed.id
    past = utcnow() - timedelta(minutes=5)
    await task_class.collection().update_one({"_id": pushed.id}, {"$set": {"lease_expires_at": past}})
    return pushed


async def stored(task: Task) -> dict[str, Any]:
    document = await type(task).collection().find_one({"_id": task.id})
    assert document is not None
    return dict(document)


@pytest.mark.wire
@pytest.mark.parametrize(
    "classes",
    [[KindA], [KindA, KindB, KindC, Fragile], [Own1, Own2, Own3, Own4], [Job, KindA, Own1, Own2, Step, AfterStep]],
    ids=["1 class", "4 classes, 1 collection", "4 classes, 4 collections", "6 classes, 5 collections"],
)
@pytest.mark.parametrize("sweep", [False, True], ids=["round", "sweep round"])
async def test_a_round_with_nothing_wrong_costs_one_command(
    backend: Backend, classes: list[type[Task]], sweep: bool
) -> None:
    await KindA().push()  # CREATED work is no maintenance business
    backend.counter.reset()
    report = await round_of(*classes, sweep=sweep)
    assert report.failures == 0 and not report.probe_refused
    assert backend.counter.by_name() == {"aggregate": 1}


@pytest.mark.wire
async def test_an_idle_worker_of_four_classes_sends_only_the_probe_each_round(backend: Backend) -> None:
    """Before: each round sent an update and a find per class; now one aggregate for all four."""
    async with running(Worker([KindA, KindB, KindC, Fragile])):
        await asyncio.sleep(1.5)  # started, first round done
        backend.counter.reset()
        await asyncio.sleep(3.0)  # about three rounds (recovery_interval 1 s)
        sent = backend.counter.on(SHARED)
    assert set(sent) <= {"aggregate"}, f"maintenance sent more than its probe: {dict(sent)}"
    assert 1 <= sent["aggregate"] <= 4, dict(sent)


@pytest.mark.parametrize("through", ["parent's recover_expired", "a round over the parent", "a worker of the parent"])
async def test_a_subclass_lease_is_recovered_under_its_own_max_redeliveries(through: str) -> None:
    fragile = await held_by_a_dead_worker(Fragile)
    sturdy = await held_by_a_dead_worker(KindA)
    if through == "parent's recover_expired":
        assert await Job.recover_expired() == 2
    elif through == "a round over the parent":
        assert (await round_of(Job)).recovered == 2
    else:
        async with running(Worker([Job])):
            await asyncio.sleep(1.5)  # its first round recovers both; it then runs the redelivered one
    lost = await stored(fragile)
    assert lost["state"] == State.FAILED.value, lost
    assert "max_redeliveries is 0" in lost["error"]
    again = await stored(sturdy)
    assert again["redeliveries"] == 1, again
    assert again["state"] == (State.FINISHED if through == "a worker of the parent" else State.CREATED).value, again


async def test_a_round_recovers_only_the_classes_with_expired_leases(backend: Backend) -> None:
    held = await held_by_a_dead_worker(KindB)
    await held_by_a_dead_worker(Own3)
    alive = await KindC().push()
    assert await KindC.task_store().claim_task("alive", alive.id) is not None
    backend.counter.reset()
    report = await round_of(KindA, KindB, KindC, Own1, Own3)
    sent = backend.counter.by_name()
    assert report.recovered == 2
    assert (await stored(held))["state"] == State.CREATED.value
    assert (await stored(alive))["state"] == State.RUNNING.value
    if not backend.is_mock:
        # The probe, then one recovery per class it named (KindB, Own3): none for the others.
        assert sent == {"aggregate": 1, "update": 2}


async def test_a_round_tells_dependents_a_dying_finisher_left_behind() -> None:
    step = await Step().push()
    after = await AfterStep(step=step).push()
    # The finisher died between ending the task and telling its dependents.
    await Step.collection().update_one({"_id": step.id}, {"$set": {"state": State.FINISHED.value}})
    assert await AfterStep.pop() is None
    await round_of(Step, AfterStep)
    released = await AfterStep.pop()
    assert released is not None and released.id == after.id
    assert "dependents_pending" not in await stored(step)


async def test_a_round_frees_the_slot_of_a_task_that_stopped_running() -> None:
    task = await held_by_a_dead_worker(Capped, concurrency_key="k")
    slots = Capped.collection().database[LIMITS_COLLECTION]
    scope = Capped.task_store().limit_scope
    await Capped.collection().update_one({"_id": task.id}, {"$set": {"state": State.FAILED.value}})
    await slots.update_many({"scope": scope}, {"$set": {"holders.0.at": utcnow() - timedelta(minutes=5)}})
    await round_of(Capped)
    assert await slots.find_one({"scope": scope}) is None


async def test_a_sweep_round_sets_aside_malformed_documents_of_its_own_classes_only() -> None:
    mine, sibling = await KindA().push(), await KindB().push()
    await Job.collection().update_many({}, {"$set": {"run_at": "not a date"}})
    await round_of(KindA)  # not a sweep round: left alone
    assert (await stored(mine))["state"] == State.CREATED.value
    await round_of(KindA, sweep=True)
    failed = await stored(mine)
    assert failed["state"] == State.FAILED.value and "malformed KindA document: run_at" in failed["error"]
    assert (await stored(sibling))["state"] == State.CREATED.value


async def test_a_refused_probe_falls_back_to_repairing_every_class(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refused(database: Any, questions: Any) -> Any:
        raise OperationFailure("Unrecognized pipeline stage name: '$unionWith'", 40324)

    monkeypatch.setattr(store, "probe", refused)
    held = await held_by_a_dead_worker(KindB)
    report = await round_of(KindA, KindB)
    assert report.probe_refused and report.recovered == 1
    assert (await stored(held))["state"] == State.CREATED.value


@pytest.mark.wire
async def test_a_server_without_union_with_is_asked_branch_by_branch(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server older than 4.4 refuses $unionWith: the probe is asked one branch at a time, from then on."""
    refused: list[int] = []
    plain_aggregate = driver.aggregate

    async def old_server(collection: Any, pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if any("$unionWith" in stage for stage in pipeline):
            refused.append(1)
            raise OperationFailure("Unrecognized pipeline stage name: '$unionWith'", driver.UNRECOGNIZED_STAGE)
        return await plain_aggregate(collection, pipeline)

    monkeypatch.setattr(driver, "aggregate", old_server)
    held = await held_by_a_dead_worker(KindB)
    reports = [await round_of(KindA, KindB, Own1) for _ in range(2)]
    assert all(r.failures == 0 and not r.probe_refused for r in reports)
    assert [r.recovered for r in reports] == [1, 0]
    assert refused == [1], "refused once, then not asked again"
    assert (await stored(held))["state"] == State.CREATED.value
