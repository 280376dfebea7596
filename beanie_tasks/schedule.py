"""Periodic tasks: one task per schedule slot, however many workers run the scheduler.

A class declares ``cron`` or ``every`` in its ``TaskSettings``. Slots are pure functions
of the clock (a cron expression in UTC, or multiples of the interval since the Unix
epoch), so every scheduler agrees on them without talking to the others.

For each class the scheduler keeps a cursor document (the last slot scheduled) in the
``beanie_tasks_schedules`` collection of the class's database. A tick for a due slot:

1. pushes the slot's task with an ``_id`` derived from the class and the slot time, so
   concurrent schedulers collide on the unique ``_id`` and only one task is stored;
2. then advances the cursor with a compare-and-set.

A crash between 1 and 2 leaves the cursor behind; the next tick pushes the same ``_id``
again (a harmless duplicate) and advances it. The next slot always comes from the
clock, never from state written after the push, so the series cannot end. Slots missed
while no scheduler ran are coalesced into one task for the most recent slot, and a new
schedule starts with the first slot after a scheduler first sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from beanie import PydanticObjectId
from croniter import croniter

from beanie_tasks import clock, driver, store
from beanie_tasks.clock import as_utc
from beanie_tasks.redact import redact_text
from beanie_tasks.task import Task, describe_error

log = logging.getLogger("beanie_tasks.schedule")

CURSOR_COLLECTION = store.SCHEDULES_COLLECTION
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
ONE_MS = timedelta(milliseconds=1)
# run_schedules sleeps until the next slot, but never longer than this (so a clock jump or
# a changed schedule is noticed) and never shorter than the floor (no spinning).
LONGEST_SLEEP = 60.0
SHORTEST_SLEEP = 0.05
LONGEST_BACKOFF = 30.0


class ScheduleError(ValueError):
    """A periodic class cannot produce its task (for example a required field without a default)."""


@dataclass(frozen=True)
class Schedule:
    """The slots of one periodic class: a cron expression (UTC) or a fixed interval in seconds."""

    cron: str | None = None
    every: float | None = None

    @classmethod
    def of(cls, task_class: type[Task]) -> Schedule | None:
        options = task_class.task_options
        if options.cron is None and options.every is None:
            return None
        return cls(cron=options.cron, every=options.every)

    def describe(self) -> str:
        return f"cron {self.cron!r}" if self.cron is not None else f"every {self.every:g}s"

    def latest(self, now: datetime) -> datetime:
        """The most recent slot at or before ``now``."""
        if self.cron is not None:
            return as_utc(croniter(self.cron, now + timedelta(microseconds=1)).get_prev(datetime))
        step = self._step_ms()
        elapsed = (now - EPOCH) // ONE_MS
        return EPOCH + (elapsed // step) * step * ONE_MS

    def following(self, now: datetime) -> datetime:
        """The first slot strictly after ``now``."""
        if self.cron is not None:
            return as_utc(croniter(self.cron, now).get_next(datetime))
        return self.latest(now) + self._step_ms() * ONE_MS

    def _step_ms(self) -> int:
        assert self.every is not None
        return max(1, round(self.every * 1000))


def schedule_key(task_class: type[Task]) -> str:
    """The cursor's ``_id``: collection and class name, stable across deploys and module moves."""
    return f"{driver.collection_of(task_class).name}.{task_class.__name__}"


def slot_id(task_class: type[Task], slot: datetime) -> PydanticObjectId:
    """The ``_id`` of the task for ``slot``: the slot's seconds, then 8 bytes of a hash of class and slot."""
    digest = hashlib.sha256(f"{schedule_key(task_class)}|{as_utc(slot).isoformat()}".encode()).digest()
    seconds = int(as_utc(slot).timestamp()) & 0xFFFFFFFF
    return PydanticObjectId(seconds.to_bytes(4, "big") + digest[:8])


def build_task(task_class: type[Task], slot: datetime) -> Task:
    """The task for ``slot``: ``task_class.for_slot(slot)`` when the class defines it, else ``task_class()``."""
    factory = getattr(task_class, "for_slot", None)
    try:
        task = factory(slot) if callable(factory) else task_class()
    except Exception as exc:
        raise ScheduleError(
            f"periodic task {task_class.__name__} cannot be built for slot {slot.isoformat()}: {describe_error(exc)}"
        ) from exc
    if not isinstance(task, task_class):
        raise ScheduleError(
            f"{task_class.__name__}.for_slot must return a {task_class.__name__}, got {type(task).__name__}"
        )
    return task


def scheduled_classes(task_classes: Sequence[type[Task]]) -> list[type[Task]]:
    """The periodic classes among ``task_classes``, each checked by building one task (fails early)."""
    found = [cls for cls in task_classes if Schedule.of(cls) is not None]
    for cls in found:
        build_task(cls, clock.utcnow())
    return found


def _describe(task_class: type[Task]) -> str:
    schedule = Schedule.of(task_class)
    return schedule.describe() if schedule is not None else "not periodic"


async def tick_class(task_class: type[Task], now: datetime | None = None) -> int:
    """Schedule ``task_class``'s most recent due slot if no scheduler has; returns 1 if this call did, else 0."""
    schedule = Schedule.of(task_class)
    if schedule is None:
        return 0
    collection = driver.collection_of(task_class)
    now = as_utc(now) if now is not None else clock.now(collection)
    slot = schedule.latest(now)
    key = schedule_key(task_class)
    cursor = await store.schedule_cursor(collection, key)
    if cursor is None:
        # First sighting: the series starts with the slot after this one.
        if await store.start_schedule(collection, key, slot, schedule.describe(), now):
            log.info(
                "%s: periodic schedule (%s) starts after %s", task_class.__name__, schedule.describe(), slot.isoformat()
            )
        return 0
    last = cursor.get("last_slot")
    if isinstance(last, datetime) and as_utc(last) >= slot:
        return 0
    task = build_task(task_class, slot)
    wanted = slot_id(task_class, slot)
    stored = await task.push(run_at=slot, task_id=wanted)
    if not await store.advance_schedule(collection, key, last, slot, schedule.describe(), now):
        return 0  # another scheduler completed this slot first
    if stored.id != wanted:
        log.info(
            "%s: slot %s skipped, task %s with the same dedupe_key is in flight",
            task_class.__name__,
            slot.isoformat(),
            stored.id,
        )
        return 0
    log.info("%s: scheduled task %s for slot %s", task_class.__name__, wanted, slot.isoformat())
    return 1


async def tick(task_classes: Sequence[type[Task]], now: datetime | None = None) -> int:
    """One scheduling pass over ``task_classes`` at ``now``; returns how many slots this call scheduled."""
    return sum([await tick_class(cls, now) for cls in task_classes])


def seconds_until_next_slot(task_classes: Sequence[type[Task]], now: datetime) -> float:
    slots = [schedule.following(now) for cls in task_classes if (schedule := Schedule.of(cls)) is not None]
    if not slots:
        return LONGEST_SLEEP
    wait = (min(slots) - now).total_seconds() + 0.01
    return min(max(wait, SHORTEST_SLEEP), LONGEST_SLEEP)


async def run_schedules(task_classes: Sequence[type[Task]], stop: asyncio.Event) -> None:
    """Schedule the periodic classes among ``task_classes`` until ``stop`` is set.

    Meant to run in the background of every worker: any number may run at once. A
    class that fails (server unreachable, task cannot be built) is logged and retried
    with backoff; it never stops the others or the worker.
    """
    periodic = [cls for cls in task_classes if Schedule.of(cls) is not None]
    if not periodic:
        return
    log.info("scheduler: %s", ", ".join(f"{cls.__name__} ({_describe(cls)})" for cls in periodic))
    failures = 0
    while not stop.is_set():
        failed = False
        for cls in periodic:
            try:
                await tick_class(cls)
            except Exception as exc:  # the scheduler must outlive any one failure
                failed = True
                log.warning("scheduler: %s: %s", cls.__name__, redact_text(describe_error(exc) or ""))
        failures = failures + 1 if failed else 0
        pause = seconds_until_next_slot(periodic, clock.now(driver.collection_of(periodic[0])))
        if failures:
            pause = min(pause, min(LONGEST_BACKOFF, 0.5 * 2 ** (failures - 1)))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)
