"""Dependency links: readiness, failure propagation, deletion and the command budget, on every backend."""

from __future__ import annotations

import warnings
from datetime import timedelta
from typing import Any

import pytest
from beanie import Link
from pydantic import Field

from beanie_tasks import DependencyType, OnFailure, PushError, State, Task, depends_on
from beanie_tasks.dependencies import declared_links
from beanie_tasks.store import Store
from beanie_tasks.task import FAR_FUTURE
from tests.conftest import Backend


class Resize(Task):
    src: str


class Audit(Task):
    note: str = ""


class Publish(Task):
    resize: Link[Resize] = depends_on(DependencyType.DIRECT)


class Report(Task):
    parts: list[Link[Resize]] = depends_on(DependencyType.ALL_OF, default_factory=list)
    any_mirror: list[Link[Resize]] = depends_on(DependencyType.ANY_OF, default_factory=list)
    audit: Link[Audit] | None = depends_on(DependencyType.DIRECT, default=None)


class Tolerant(Task):
    parts: list[Link[Resize]] = depends_on(DependencyType.ALL_OF, on_failure=OnFailure.RUN)


class Announce(Task):
    publish: Link[Publish] = depends_on(DependencyType.DIRECT)


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)

    class PlainForm(Task):
        resize: Link[Resize] = Field(dependency_type=DependencyType.DIRECT)  # type: ignore[call-overload]


class Standalone(Task):
    n: int = 0


MODELS = (Resize, Audit, Publish, Report, Tolerant, Announce, PlainForm, Standalone)


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(*MODELS)


async def run(task_class: type[Task]) -> Task:
    """Pop the next task of ``task_class`` (it must be there)."""
    task = await task_class.pop()
    assert task is not None, f"expected a ready {task_class.__name__}"
    return task


async def state_of(task: Task) -> tuple[State, str | None]:
    stored = await type(task).get(task.id)
    assert stored is not None
    return stored.state, stored.error


def test_declarations_are_discovered_at_class_creation() -> None:
    assert [(f.name, f.kind) for f in declared_links(Report)] == [
        ("parts", DependencyType.ALL_OF),
        ("any_mirror", DependencyType.ANY_OF),
        ("audit", DependencyType.DIRECT),
    ]
    assert declared_links(PlainForm)[0].on_failure is OnFailure.FAIL
    assert declared_links(Tolerant)[0].on_failure is OnFailure.RUN
    assert declared_links(Standalone) == ()


def test_the_helper_raises_no_deprecation_warning_and_bad_values_fail_early() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class Quiet(Task):
            resize: Link[Resize] = depends_on(DependencyType.DIRECT)

    assert declared_links(Quiet)[0].kind is DependencyType.DIRECT
    with pytest.raises(ValueError):
        depends_on("SOME_OF")
    with pytest.raises(TypeError, match=r"Broken\.resize"):

        class Broken(Task):
            resize: Link[Resize] = Field(json_schema_extra={"dependency_type": "SOME_OF"})


async def test_direct_dependency_blocks_until_finished() -> None:
    resize = await Resize(src="a.png").push()
    publish = await Publish(resize=resize).push()
    assert publish.run_at == FAR_FUTURE
    assert await Publish.pop() is None
    claimed = await run(Resize)
    assert await Publish.pop() is None, "a RUNNING dependency is not met"
    await claimed.finish()
    ready = await run(Publish)
    assert ready.id == publish.id and ready.run_at is not None and ready.run_at < FAR_FUTURE
    assert isinstance(ready.resize, Link)


async def test_plain_field_form_works_and_finishing_without_pop_counts() -> None:
    resize = await Resize(src="b").push()
    await PlainForm(resize=resize).push()
    assert await PlainForm.pop() is None
    await resize.finish()
    assert await PlainForm.pop() is not None


async def test_already_finished_dependency_counts_at_push() -> None:
    resize = await Resize(src="c").push()
    await (await run(Resize)).finish()
    publish = await Publish(resize=resize).push()
    assert publish.run_at is not None and publish.run_at < FAR_FUTURE
    assert (await run(Publish)).id == publish.id


@pytest.mark.parametrize("outcome", ["finish", "fail", "delete"])
async def test_dependency_ending_between_the_check_and_the_registration(
    monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    """The push read the dependency as in flight; it ends before the push registers on it."""
    resize = await Resize(src="race").push()
    register = Store.register_dependent

    async def end_first(self: Store, *args: Any) -> Any:
        if outcome == "finish":
            await resize.finish()
        elif outcome == "fail":
            await resize.fail("late failure", retry=False)
        else:
            await resize.delete()
        return await register(self, *args)

    monkeypatch.setattr(Store, "register_dependent", end_first)
    publish = await Publish(resize=resize).push()
    state, error = await state_of(publish)
    if outcome == "finish":
        assert state is State.CREATED and publish.run_at is not None and publish.run_at < FAR_FUTURE
        assert (await run(Publish)).id == publish.id
    else:
        assert state is State.FAILED and publish.state is State.FAILED
        assert error is not None and ("late failure" in error if outcome == "fail" else "deleted" in error)


async def test_requested_delay_is_kept_while_parked() -> None:
    resize = await Resize(src="d").push()
    publish = await Publish(resize=resize).push(delay=timedelta(hours=1))
    await resize.finish()
    assert await Publish.pop() is None, "released to its own run_at, an hour away"
    stored = await Publish.get(publish.id)
    assert stored is not None and stored.run_at is not None
    assert timedelta(minutes=59) < stored.run_at - stored.created_at < timedelta(minutes=61)


async def test_all_of_any_of_and_optional_combined() -> None:
    parts = [await Resize(src=f"p{i}").push() for i in range(2)]
    mirrors = [await Resize(src=f"m{i}").push() for i in range(2)]
    report = await Report(parts=parts, any_mirror=mirrors).push()
    assert await Report.pop() is None
    await parts[0].finish()
    await mirrors[1].finish()
    assert await Report.pop() is None, "ALL_OF still waits for parts[1]"
    await parts[1].finish()
    assert (await run(Report)).id == report.id


async def test_empty_lists_and_missing_optional_links_count_as_met() -> None:
    report = await Report().push()
    assert report.run_at is not None and report.run_at < FAR_FUTURE
    assert (await run(Report)).id == report.id


async def test_any_of_is_met_by_one_finish_even_when_others_fail() -> None:
    mirrors = [await Resize(src=f"m{i}").push() for i in range(3)]
    await Report(any_mirror=mirrors).push()
    await mirrors[0].fail("mirror down", retry=False)
    assert await Report.pop() is None
    await mirrors[2].finish()
    assert await Report.pop() is not None
    await mirrors[1].cancel()


async def test_any_of_fails_only_when_every_link_failed() -> None:
    mirrors = [await Resize(src=f"m{i}").push() for i in range(2)]
    report = await Report(any_mirror=mirrors).push()
    await mirrors[0].fail("first down", retry=False)
    assert (await state_of(report))[0] is State.CREATED
    await mirrors[1].cancel()
    state, error = await state_of(report)
    assert state is State.FAILED
    assert error is not None and "any_mirror" in error and str(mirrors[1].id) in error


async def test_failure_propagates_down_the_graph_with_the_reason() -> None:
    resize = await Resize(src="e").push()
    publish = await Publish(resize=resize).push()
    announce = await Announce(publish=publish).push()
    claimed = await run(Resize)
    await claimed.fail(RuntimeError("disk full"), retry=False)
    state, error = await state_of(publish)
    assert state is State.FAILED and error is not None
    assert f"Resize {resize.id} ended FAILED" in error and "disk full" in error
    state, error = await state_of(announce)
    assert state is State.FAILED and error is not None
    assert f"Publish {publish.id} ended FAILED" in error and "disk full" in error, "the root cause is kept"
    assert await Publish.pop() is None and await Announce.pop() is None


async def test_requeue_failed_leaves_dependents_failed_by_their_links() -> None:
    resize = await Resize(src="n").push()
    publish = await Publish(resize=resize).push()
    await resize.fail("first try", retry=False)
    late = await Publish(resize=resize).push()
    assert late.state is State.FAILED
    assert await Resize.requeue_failed() == 1
    assert await Publish.requeue_failed() == 0, "they would run without their links"
    assert (await state_of(publish))[0] is State.FAILED and (await state_of(late))[0] is State.FAILED
    await (await run(Resize)).finish()
    assert await Publish.pop() is None


async def test_retries_do_not_propagate_until_exhausted() -> None:
    resize = await Resize(src="f", max_attempts=2).push()
    publish = await Publish(resize=resize).push()
    await (await run(Resize)).fail("flaky", retry_in=0)
    assert (await state_of(publish))[0] is State.CREATED
    await (await run(Resize)).finish()
    assert (await run(Publish)).id == publish.id


async def test_all_of_fails_as_soon_as_one_link_fails() -> None:
    parts = [await Resize(src=f"p{i}").push() for i in range(3)]
    report = await Report(parts=parts).push()
    await parts[1].cancel()
    state, error = await state_of(report)
    assert state is State.FAILED and error is not None and "parts" in error and "CANCELLED" in error


async def test_dependency_already_failed_at_push_fails_the_dependent_at_once() -> None:
    resize = await Resize(src="g").push()
    await resize.fail("broken", retry=False)
    publish = await Publish(resize=resize).push()
    assert publish.state is State.FAILED and publish.error is not None and "broken" in publish.error
    assert (await state_of(publish))[0] is State.FAILED


async def test_run_anyway_policy_runs_once_every_link_ended() -> None:
    parts = [await Resize(src=f"p{i}").push() for i in range(2)]
    tolerant = await Tolerant(parts=parts).push()
    await parts[0].fail("lost", retry=False)
    assert await Tolerant.pop() is None
    await parts[1].finish()
    assert (await run(Tolerant)).id == tolerant.id


async def test_cancelling_a_waiting_dependent_leaves_its_dependencies_alone() -> None:
    resize = await Resize(src="h").push()
    publish = await Publish(resize=resize).push()
    assert await publish.cancel()
    await resize.finish()
    assert (await state_of(publish))[0] is State.CANCELLED
    assert await Publish.pop() is None


async def test_link_to_a_task_that_does_not_exist_is_rejected_before_writing() -> None:
    ghost = Resize(src="ghost")
    with pytest.raises(PushError, match="never pushed"):
        await Publish(resize=ghost).push()  # never pushed: it has no id yet
    resize = await Resize(src="i").push()
    await resize.delete()
    with pytest.raises(PushError, match="does not exist"):
        await Publish(resize=resize).push()
    assert await Publish.find_all().count() == 0


async def test_deleted_dependency_fails_the_waiting_dependent_at_the_next_sweep() -> None:
    parts = [await Resize(src=f"p{i}").push() for i in range(2)]
    report = await Report(parts=parts).push()
    tolerant = await Tolerant(parts=parts).push()
    await parts[1].finish()
    await parts[0].delete()
    assert (await state_of(report))[0] is State.CREATED, "nothing noticed yet"
    assert await Report.check_dependencies() == 1
    state, error = await state_of(report)
    assert state is State.FAILED and error is not None and "deleted" in error and str(parts[0].id) in error
    await Tolerant.check_dependencies()
    assert (await run(Tolerant)).id == tolerant.id, "run-anyway treats a deleted link as ended"


async def test_recover_expired_tells_dependents_a_dying_finisher_left_behind() -> None:
    resize = await Resize(src="j").push()
    publish = await Publish(resize=resize).push()
    # The finisher died between ending the task and telling its dependents.
    await Resize.collection().update_one({"_id": resize.id}, {"$set": {"state": State.FINISHED.value}})
    assert await Publish.pop() is None
    await Resize.recover_expired()
    assert (await run(Publish)).id == publish.id
    stored = await Resize.collection().find_one({"_id": resize.id})
    assert "dependents_pending" not in stored


async def test_bulk_terminal_writes_outside_the_library_are_repaired_by_the_sweep() -> None:
    resizes = [await Resize(src=f"bulk{i}").push() for i in range(2)]
    publishes = [await Publish(resize=r).push() for r in resizes]
    ids = [r.id for r in resizes]
    await Resize.collection().update_many({"_id": {"$in": ids}}, {"$set": {"state": State.FINISHED.value}})
    await Resize.recover_expired()  # its sweep tells the dependents of ended tasks whose flag is still set
    assert {(await run(Publish)).id for _ in publishes} == {p.id for p in publishes}


async def test_a_dependent_whose_registration_was_lost_is_registered_again() -> None:
    resize = await Resize(src="k").push()
    publish = await Publish(resize=resize).push()
    # The producer died after inserting the dependent, before telling the dependency.
    forgotten = {"$unset": {"dependents_in": "", "dependents_pending": ""}}
    await Resize.collection().update_one({"_id": resize.id}, forgotten)
    assert await Publish.check_dependencies() == 1
    await resize.finish()
    assert (await run(Publish)).id == publish.id


async def test_telling_a_dependent_twice_changes_nothing() -> None:
    parts = [await Resize(src=f"p{i}").push() for i in range(2)]
    report = await Report(parts=parts).push()
    await parts[0].finish()
    # Replay the notification the way a sweep would after a crash.
    await Resize.collection().update_one({"_id": parts[0].id}, {"$set": {"dependents_pending": True}})
    await Resize.recover_expired()
    assert await Report.pop() is None, "ALL_OF still waits for parts[1]"
    await parts[1].finish()
    assert (await run(Report)).id == report.id


async def test_dependency_in_another_class_and_dedupe_twin() -> None:
    audit = await Audit(note="x").push()
    first = await Report(audit=audit, dedupe_key="r").push()
    twin = await Report(audit=audit, dedupe_key="r").push()
    assert twin.id == first.id
    await audit.finish()
    assert (await run(Report)).id == first.id
    assert await Report.pop() is None


@pytest.mark.wire
async def test_pop_is_one_command_with_or_without_links_and_plain_finish_is_one(backend: Backend) -> None:
    await Standalone().push()
    resize = await Resize(src="l").push()
    await Publish(resize=resize).push()
    await resize.finish()
    for task_class in (Standalone, Publish):
        backend.counter.reset()
        task = await task_class.pop()
        assert task is not None
        assert backend.counter.by_name() == {"findAndModify": 1}, task_class.__name__
        backend.counter.reset()
        await task.finish()
        assert backend.counter.total == 1, backend.counter.commands
    backend.counter.reset()
    assert await Publish.pop() is None
    assert backend.counter.total == 1


@pytest.mark.wire
async def test_finishing_a_task_with_one_dependent_costs_four_commands_more(backend: Backend) -> None:
    resize = await Resize(src="one").push()
    await Publish(resize=resize).push()
    claimed = await run(Resize)
    backend.counter.reset()
    await claimed.finish()
    # The finish + 1 find of the dependents + 1 findAndModify telling it (its answer is what it now counts)
    # + 1 update releasing it + 1 to clear the pending flag.
    assert backend.counter.by_name() == {"findAndModify": 2, "find": 1, "update": 2}, backend.counter.commands
    assert await Publish.pop() is not None


@pytest.mark.wire
@pytest.mark.parametrize("dependents", [3, 120])  # 120: more than a first cursor batch (101)
async def test_finishing_a_task_with_dependents_costs_per_page_not_per_dependent(
    backend: Backend, dependents: int
) -> None:
    resize = await Resize(src="m").push()
    for _ in range(dependents):
        await Publish(resize=resize).push()
    claimed = await run(Resize)
    backend.counter.reset()
    await claimed.finish()
    # 1 finish + 1 find of the dependents + 1 bulk write telling them + 1 read of what they now count
    # + 1 bulk write releasing those ready + 1 to clear the pending flag, whatever the number of dependents.
    assert backend.counter.by_name() == {"findAndModify": 1, "find": 2, "update": 3}, backend.counter.commands
    released = [await run(Publish) for _ in range(dependents)]
    assert len({task.id for task in released}) == dependents


async def test_one_page_of_dependents_with_every_outcome() -> None:
    """One failure tells a page holding dependents that fail, cascade, run anyway, fail at once and keep waiting."""
    failing, other = await Resize(src="f").push(), await Resize(src="o").push()
    publishes = [await Publish(resize=failing).push() for _ in range(2)]
    announce = await Announce(publish=publishes[0]).push()
    tolerant = await Tolerant(parts=[failing]).push()
    all_of = await Report(parts=[failing, other]).push()
    any_of = await Report(any_mirror=[failing, other]).push()
    claimed = await run(Resize)
    assert claimed.id == failing.id
    await claimed.fail("broken", retry=False)
    for task in (*publishes, announce, all_of):
        state, error = await state_of(task)
        assert state is State.FAILED and error, (type(task).__name__, state)
    assert (await state_of(any_of))[0] is State.CREATED
    assert (await run(Tolerant)).id == tolerant.id
    assert await Report.pop() is None, "the ANY_OF report still waits for its other link"
    await (await run(Resize)).finish()
    assert (await run(Report)).id == any_of.id
