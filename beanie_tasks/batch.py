"""Batched claims and acknowledgements: k tasks for a fixed handful of commands.

``claim_batch`` takes up to ``k`` ready tasks in three commands whatever ``k`` is:

1. a ``find`` of the ids of the first ``k`` claimable tasks, in claim order (the
   same filter, sort and ``bt_claim`` index hint as ``pop()``);
2. one ``update_many`` that moves those of them that are *still* CREATED and due to
   RUNNING under a fresh lease token, so a task another consumer took in between
   is skipped, never shared;
3. a ``find`` by id and that token, which returns exactly the tasks this call won.

``finish_batch`` acknowledges many finishes with one ``bulk_write`` whose every
update is guarded by that task's id, RUNNING state and lease token, exactly like
``Task.finish()``: a consumer whose lease was lost changes nothing. For classes other
tasks may depend on, one more ``find`` picks out the finished tasks that have dependents,
which are then told as ``Task.finish()`` tells them.

At k = 16 a task costs (3 + 1) / 16 = 0.25 commands instead of 2.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from beanie.odm.utils.encoder import Encoder
from pydantic import ValidationError

from beanie_tasks import dependencies, driver
from beanie_tasks.states import State
from beanie_tasks.task import CLAIM_INDEX, CLAIM_SORT, Task, default_consumer_id, utcnow

T = TypeVar("T", bound=Task)

MAX_BATCH = 1000
# A batch that lost every candidate to other consumers tries again this many times.
CLAIM_ROUNDS = 3


def claim_order(task: Task) -> tuple[int, Any, Any]:
    """The key that sorts tasks as ``pop()`` would claim them (priority desc, run_at, _id)."""
    return (-task.priority, task.run_at, task.id)


async def claim_batch(task_class: type[T], k: int, *, consumer_id: str | None = None) -> list[T]:
    """Claim up to ``k`` ready tasks of ``task_class`` at once, in claim order.

    Every returned task is RUNNING and leased to this consumer, exactly as if
    ``pop()`` had returned it; an empty list means nothing was ready. The tasks share
    one lease token, and each one's lease still stands alone (heartbeat, fail, release).
    Rate and concurrency limits are the worker's business: a batch does not apply them.
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= MAX_BATCH:
        raise ValueError(f"k must be between 1 and {MAX_BATCH}, got {k}")
    collection = task_class.collection()
    for _ in range(CLAIM_ROUNDS):
        now = utcnow()
        claimable = task_class.claim_filter(now)
        # Pinned to the claim index, as pop() is, so no server's planner picks a scan plus a sort.
        hint = driver.index_hint(collection, CLAIM_INDEX)
        cursor = collection.find(claimable, {"_id": 1}, sort=CLAIM_SORT, limit=k, **hint)
        candidates = [row["_id"] async for row in cursor]
        if not candidates:
            return []
        token = uuid.uuid4().hex
        result = await collection.update_many(
            claimable | {"_id": {"$in": candidates}},
            {
                "$set": {
                    "state": State.RUNNING.value,
                    "consumer_id": consumer_id or default_consumer_id(),
                    "lease_token": token,
                    "lease_expires_at": now + task_class.task_options.lease,
                    "started_at": now,
                },
                "$inc": {"attempts": 1},
            },
        )
        if result.modified_count == 0:
            continue  # every candidate went to another consumer: look again
        won = [doc async for doc in collection.find({"_id": {"$in": candidates}, "lease_token": token})]
        return sorted(await _validated(task_class, won), key=claim_order)
    return []


async def _validated(task_class: type[T], documents: list[dict[str, Any]]) -> list[T]:
    """Model every claimed document; foreign or malformed ones are set aside as ``pop()`` does."""
    tasks: list[T] = []
    for document in documents:
        foreign = task_class._foreign_class(document)
        if foreign is not None:
            await task_class._set_aside(document, foreign)
            continue
        try:
            tasks.append(task_class.model_validate(document))
        except ValidationError as exc:
            await task_class._quarantine(document, exc)
    return tasks


@dataclass
class Acknowledgement(Generic[T]):
    """What ``finish_batch`` did: the tasks now FINISHED, and those whose lease was lost."""

    finished: list[T] = field(default_factory=list)
    lost: list[T] = field(default_factory=list)


async def finish_batch(tasks: Sequence[T], results: Sequence[Any] | None = None) -> Acknowledgement[T]:
    """Mark many leased tasks FINISHED with one ``bulk_write`` (tasks may be of several classes).

    Each update is guarded by the task's lease, as ``Task.finish()`` is. Tasks whose lease
    was lost (or that were cancelled) are left untouched and reported in ``lost``; that
    costs one extra ``find`` per class, only when something was lost.
    """
    if results is not None and len(results) != len(tasks):
        raise ValueError(f"got {len(results)} results for {len(tasks)} tasks")
    outcome: Acknowledgement[T] = Acknowledgement()
    by_class: dict[type[Task], list[tuple[T, Any]]] = {}
    for index, task in enumerate(tasks):
        if task.id is None or task.lease_token is None or task.state is not State.RUNNING:
            raise ValueError(f"{type(task).__name__} {task.id} is not a task claimed by this consumer")
        by_class.setdefault(type(task), []).append((task, results[index] if results is not None else None))
    for task_class, pairs in by_class.items():
        await _finish_same_class(task_class, pairs, outcome)
    return outcome


async def _finish_same_class(task_class: type[Task], pairs: list[tuple[T, Any]], outcome: Acknowledgement[T]) -> None:
    now = utcnow()
    encoder = Encoder(to_db=True)
    terminal = task_class._terminal_fields(State.FINISHED, now)
    updates = [
        (
            {"_id": task.id, "state": State.RUNNING.value, "lease_token": task.lease_token},
            {"$set": terminal | {"result": encoder.encode(result)}, "$unset": {"dedupe_slot": ""}},
        )
        for task, result in pairs
    ]
    collection = task_class.collection()
    matched = await driver.bulk_update(collection, updates)
    finished_ids = {task.id for task, _ in pairs}
    if matched < len(pairs):
        tokens = {task.id: task.lease_token for task, _ in pairs}
        cursor = collection.find({"_id": {"$in": list(tokens)}}, {"state": 1, "lease_token": 1})
        finished_ids = {
            row["_id"]
            async for row in cursor
            if row.get("state") == State.FINISHED.value and row.get("lease_token") == tokens[row["_id"]]
        }
    # Tell the dependents of those that have any, as Task.finish() does (one find, only for link targets).
    await dependencies.after_terminal_many(task_class, finished_ids)
    for task, result in pairs:
        if task.id in finished_ids:
            task._adopt(terminal | {"result": result})
            task._settled = True
            outcome.finished.append(task)
        else:
            outcome.lost.append(task)
