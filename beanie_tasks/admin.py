"""Operating a queue: counts, requeueing, purging, and setting aside documents no claim can run.

Each operation is scoped to one task class (and its subclasses) through its ``Store``,
so a sibling class sharing the collection is never touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from beanie_tasks import dependencies
from beanie_tasks.redact import get_logger
from beanie_tasks.states import IN_FLIGHT_STATES, PRIORITY_RANGE, State
from beanie_tasks.store import Store

log = get_logger("beanie_tasks")

MAX_SET_ASIDE_PER_ROUND = 100


async def counts(store: Store) -> dict[State, int]:
    """How many tasks are in each state (every state present, zero included)."""
    found = await store.count_by_state()
    return {state: found.get(state.value, 0) for state in State}


@dataclass
class RequeueReport:
    """What ``requeue_failed`` did: tasks requeued, dependents requeued with them, and why others were not."""

    requeued: int = 0
    dependents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, count: int = 1) -> None:
        if count:
            self.skipped[reason] = self.skipped.get(reason, 0) + count

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


FAILED_BY_LINK = "failed because a dependency failed (requeue that dependency with its dependents)"
FAILED_WHILE_PARKED = "failed while it still waited for a dependency"
DEDUPE_TAKEN = "its dedupe_key is taken by a live task"


async def requeue_failed_report(store: Store, *, with_dependents: bool = False) -> RequeueReport:
    """Give FAILED tasks a fresh set of attempts; says how many, and why the others stay FAILED.

    A task failed because a dependency failed, or while still waiting for one, stays
    FAILED: requeued alone, it would run without its links. ``with_dependents`` also
    requeues, down the graph, the dependents that failed because a requeued task failed:
    each waits again for its links, so it runs after them. A task whose ``dedupe_key``
    is taken by a newer in-flight task stays FAILED. The error of each requeued task is
    kept as ``last_error``.
    """
    report = RequeueReport()
    requeued, clashes, parents = await store.requeue(store.now(), with_dependents=with_dependents)
    report.requeued = requeued
    report.skip(DEDUPE_TAKEN, clashes)
    left: list[Any] = []
    if parents:
        restored = await dependencies.requeue_dependents(store, parents)
        report.dependents = restored.restored
        for task_id, reason in restored.skipped:
            report.skip(reason)
            left.append(task_id)
    by_link, parked = await store.unrequeueable(besides=left)
    report.skip(FAILED_BY_LINK, by_link)
    report.skip(FAILED_WHILE_PARKED, parked)
    return report


async def requeue_failed(store: Store, *, with_dependents: bool = False) -> int:
    """Give FAILED tasks a fresh set of attempts; returns how many were requeued (see ``requeue_failed_report``)."""
    report = await requeue_failed_report(store, with_dependents=with_dependents)
    return report.requeued + report.dependents


async def purge(store: Store, states: Iterable[State | str], *, force: bool = False) -> int:
    """Delete tasks in the given states; in-flight states need ``force=True``."""
    wanted = {State(s) for s in states}
    if not wanted:
        raise ValueError("purge needs at least one state")
    live = wanted & IN_FLIGHT_STATES
    if live and not force:
        raise ValueError(f"refusing to purge in-flight states {sorted(s.value for s in live)} without force=True")
    return await store.delete_in_states(s.value for s in wanted)


async def set_aside(
    store: Store, document: Mapping[str, Any], reason: str, guard: dict[str, Any] | None = None
) -> bool:
    """Mark one document FAILED with ``reason`` so it cannot block the queue, and tell its dependents."""
    log.error("%s %s set aside: %s", store.name, document.get("_id"), reason)
    partition = document.get(store.partition_field) if store.partition_field else None
    selector = guard or store.by_id(document["_id"], partition) | {"lease_token": document.get("lease_token")}
    returned = await store.set_aside(selector, reason)
    if returned is not None:
        await dependencies.after_terminal(store, document["_id"], State.FAILED.value, reason, returned)
    return returned is not None


async def set_aside_unclaimable(store: Store, *, limit: int = MAX_SET_ASIDE_PER_ROUND) -> int:
    """Mark FAILED, with the reason, documents that no claim or recovery would ever pick up.

    An unknown, missing or array state, a CREATED task whose ``run_at`` is missing or not
    a date, a RUNNING task without a ``lease_expires_at`` date: left alone, each would
    sit in the collection forever. Returns how many documents were set aside.
    """
    count = 0
    for row, guard, field_name, problem in await store.unclaimable(limit):
        count += await set_aside_malformed(store, row, guard, field_name, problem)
    return count


async def set_aside_malformed(
    store: Store, row: Mapping[str, Any], guard: dict[str, Any], field_name: str, problem: str
) -> bool:
    """Set aside one document whose ``field_name`` has ``problem`` (see ``store.UNCLAIMABLE_CHECKS``)."""
    value = repr(row.get(field_name, "<missing>"))[:100]
    reason = f"malformed {store.name} document: {field_name} {value} {problem}; it can never be claimed"
    return await set_aside(store, row, reason, guard)


async def check_dependencies(store: Store) -> int:
    """Repair dependency bookkeeping now (deleted links, lost notifications); see ``dependencies.sweep``."""
    return await dependencies.check_dependencies(store)


# ------------------------------------------------------------------ one task at a time
# The operator's actions on single tasks (the dashboard's buttons), each one guarded write.


async def cancel_task(store: Store, task_id: Any) -> bool:
    """Cancel a CREATED or RUNNING task of this class, and tell its dependents; False when it had already ended.

    A task's class never changes, so checking it first cannot race with the guarded write.
    """
    if await store.find_in_scope(task_id, {"_id": 1}) is None:
        return False
    returned = await store.cancel(task_id, store.now())
    if returned is None:
        return False
    await dependencies.after_terminal(store, task_id, State.CANCELLED.value, None, returned)
    return True


async def requeue_task(store: Store, task_id: Any) -> bool:
    """Run one FAILED task again with fresh attempts (the rules of ``requeue_failed``)."""
    return await store.requeue_one(task_id, store.now())


async def run_now(store: Store, task_id: Any) -> bool:
    """Make a waiting task due now (one waiting for links runs as soon as they are met)."""
    return await store.run_now(task_id, store.now())


async def change_priority(store: Store, task_id: Any, priority: int) -> bool:
    """Give a waiting task another priority (an integer in ``PRIORITY_RANGE``)."""
    low, high = PRIORITY_RANGE
    if isinstance(priority, bool) or not isinstance(priority, int) or not low <= priority <= high:
        raise ValueError(f"priority must be a whole number from {low} to {high}, got {priority!r}")
    return await store.set_priority(task_id, priority)


async def delete_task(store: Store, task_id: Any) -> bool:
    """Delete one ended task; a CREATED or RUNNING task must be cancelled first."""
    return await store.delete_ended(task_id)
