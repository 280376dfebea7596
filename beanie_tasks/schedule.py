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
clock, never from state written after the push, so the series cannot end. A new
schedule starts with the first slot after a scheduler first sees it.

A tick that finds more than one slot due since the cursor (no scheduler ran for a while)
follows the class's ``missed`` policy: ``"skip"`` schedules the most recent slot and logs
a warning naming the slots skipped; ``"catch_up"`` schedules each slot, oldest first and
each with its own ``_id``, moving the cursor one slot at a time (so racing schedulers
still store each slot once, and a crash resumes where it stopped), at most
``catch_up_limit`` of them: a warning names the older slots that bound dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from beanie import PydanticObjectId
from croniter import croniter
from pydantic import ValidationError

from beanie_tasks import clock, driver, store
from beanie_tasks.clock import as_utc
from beanie_tasks.options import MissedPolicy
from beanie_tasks.redact import get_logger, redact_text
from beanie_tasks.task import Task, describe_error

log = get_logger("beanie_tasks.schedule")

CURSOR_COLLECTION = store.SCHEDULES_COLLECTION
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
ONE_MS = timedelta(milliseconds=1)
# run_schedules sleeps until the next slot, but never longer than this (so a clock jump or
# a changed schedule is noticed) and never shorter than the floor (no spinning).
LONGEST_SLEEP = 60.0
SHORTEST_SLEEP = 0.05
LONGEST_BACKOFF = 30.0
# A warning about missed slots names each one up to this many, else the first, the last and
# the count, so one late tick never logs thousands of lines.
NAMED_SLOTS = 10
# Counting a cron gap walks it slot by slot (about 0.1 ms each): beyond this many a warning
# says "more than". Interval gaps are counted exactly, by arithmetic.
COUNT_LIMIT = 1000
# A tick that loses the cursor to another scheduler reads it again and goes on from there
# (the other may be behind it in time), this many times at most.
RACE_ROUNDS = 10


class ScheduleError(ValueError):
    """A periodic class cannot produce its task (for example a required field without a default)."""


def _iso(slot: datetime) -> str:
    return slot.isoformat()


@dataclass(frozen=True)
class Gap:
    """The slots strictly between two times: each of them when few, else the first, the last and how many."""

    count: int = 0
    first: datetime | None = None
    last: datetime | None = None
    slots: tuple[datetime, ...] = ()  # every slot, oldest first, when count <= NAMED_SLOTS
    at_least: bool = False  # count is a lower bound: a cron gap longer than COUNT_LIMIT slots

    def describe(self) -> str:
        noun = "slot" if self.count == 1 else "slots"
        if self.slots and not self.at_least:
            return f"{self.count} missed {noun} ({', '.join(_iso(slot) for slot in self.slots)})"
        more = "more than " if self.at_least else ""
        assert self.first is not None and self.last is not None
        return f"{more}{self.count} missed {noun}, the first {_iso(self.first)} and the last {_iso(self.last)}"


@dataclass(frozen=True)
class Schedule:
    """The slots of one periodic class: a cron expression (UTC) or a fixed interval in seconds.

    ``missed`` and ``catch_up_limit`` say what a tick does with slots it finds it missed.
    """

    cron: str | None = None
    every: float | None = None
    missed: MissedPolicy = "skip"
    catch_up_limit: int = 100

    @classmethod
    def of(cls, task_class: type[Task]) -> Schedule | None:
        options = task_class.task_options
        if options.cron is None and options.every is None:
            return None
        return cls(cron=options.cron, every=options.every, missed=options.missed, catch_up_limit=options.catch_up_limit)

    def describe(self) -> str:
        return f"cron {self.cron!r}" if self.cron is not None else f"every {self.every:g}s"

    def latest(self, now: datetime) -> datetime:
        """The most recent slot at or before ``now``."""
        if self.cron is not None:
            return as_utc(croniter(self.cron, now + timedelta(microseconds=1)).get_prev(datetime))
        return self._slot(self._index(now))

    def following(self, now: datetime) -> datetime:
        """The first slot strictly after ``now``."""
        if self.cron is not None:
            return as_utc(croniter(self.cron, now).get_next(datetime))
        return self.latest(now) + self._step_ms() * ONE_MS

    def newest(self, after: datetime, until: datetime, limit: int) -> list[datetime]:
        """The newest ``limit`` slots after ``after`` and at or before ``until``, oldest first."""
        if self.cron is None:
            last = self._index(until)
            return [self._slot(k) for k in range(max(self._index(after) + 1, last - limit + 1), last + 1)]
        found: list[datetime] = []
        walk = croniter(self.cron, until + timedelta(microseconds=1))
        while len(found) < limit and (slot := as_utc(walk.get_prev(datetime))) > after:
            found.append(slot)
        return found[::-1]

    def between(self, after: datetime, before: datetime) -> Gap:
        """The slots strictly after ``after`` and strictly before ``before``."""
        if self.cron is None:
            step = self._step_ms()
            lo = self._index(after) + 1
            hi = (-((before - EPOCH) // -ONE_MS) - 1) // step  # the last multiple of step below before
            count = max(0, hi - lo + 1)
            if not count:
                return Gap()
            named = tuple(self._slot(k) for k in range(lo, hi + 1)) if count <= NAMED_SLOTS else ()
            return Gap(count, self._slot(lo), self._slot(hi), named)
        walk = croniter(self.cron, after)
        seen: list[datetime] = []
        count, last = 0, after
        slot = as_utc(walk.get_next(datetime))
        while slot < before and count < COUNT_LIMIT:
            count += 1
            if count <= NAMED_SLOTS:
                seen.append(slot)
            last, slot = slot, as_utc(walk.get_next(datetime))
        if not count:
            return Gap()
        if slot < before:  # stopped counting: name the last slot of the gap without walking to it
            return Gap(count, seen[0], as_utc(croniter(self.cron, before).get_prev(datetime)), at_least=True)
        return Gap(count, seen[0], last, tuple(seen) if count <= NAMED_SLOTS else ())

    def _step_ms(self) -> int:
        assert self.every is not None
        return max(1, round(self.every * 1000))

    def _index(self, moment: datetime) -> int:
        """How many whole intervals since the epoch ``moment`` is: its slot is that many steps in."""
        return int((moment - EPOCH) // ONE_MS) // self._step_ms()

    def _slot(self, index: int) -> datetime:
        return EPOCH + index * self._step_ms() * ONE_MS


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
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors()[:5])
        raise ScheduleError(
            f"periodic task {task_class.__name__} cannot be built for slot {slot.isoformat()}: {problems} "
            "(give its fields defaults, or define a for_slot(slot) classmethod that builds the task)"
        ) from exc
    except Exception as exc:
        reason = " ".join(str(describe_error(exc)).split())
        raise ScheduleError(
            f"periodic task {task_class.__name__} cannot be built for slot {slot.isoformat()}: {reason}"
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
    """Schedule ``task_class``'s due slots that no scheduler has; returns how many this call scheduled.

    With ``missed = "skip"`` that is the most recent due slot, and a warning names the slots
    skipped since the cursor. With ``missed = "catch_up"`` it is every slot since the
    cursor, oldest first, at most ``catch_up_limit`` of them (the newest), and a warning
    names the older slots the bound dropped.
    """
    schedule = Schedule.of(task_class)
    if schedule is None:
        return 0
    collection = driver.collection_of(task_class)
    now = as_utc(now) if now is not None else clock.now(collection)
    latest = schedule.latest(now)
    key = schedule_key(task_class)
    scheduled = 0
    for _ in range(RACE_ROUNDS):
        cursor = await store.schedule_cursor(collection, key)
        if cursor is None:
            # First sighting: the series starts with the slot after this one.
            if await store.start_schedule(collection, key, latest, schedule.describe(), now):
                log.info(
                    "%s: periodic schedule (%s) starts after %s",
                    task_class.__name__,
                    schedule.describe(),
                    latest.isoformat(),
                )
            return scheduled
        last = cursor.get("last_slot")
        if isinstance(last, datetime) and as_utc(last) >= latest:
            return scheduled
        count, finished = await _schedule_since(task_class, schedule, key, cursor, latest, now)
        scheduled += count
        if finished:
            return scheduled
        # Lost a race: another scheduler moved the cursor; look again from where it is now.
    return scheduled


async def _schedule_since(
    task_class: type[Task], schedule: Schedule, key: str, cursor: dict[str, Any], latest: datetime, now: datetime
) -> tuple[int, bool]:
    """Schedule the slots after ``cursor`` up to ``latest`` (per the policy), moving the cursor slot by slot.

    Returns how many this call scheduled, and False if another scheduler moved the cursor
    under it before it was done.
    """
    collection = driver.collection_of(task_class)
    last = cursor.get("last_slot")
    # Slots after the cursor were missed only if it belongs to this schedule: after a change
    # of schedule the new series starts with its latest slot.
    since = as_utc(last) if isinstance(last, datetime) and cursor.get("schedule") == schedule.describe() else None
    if schedule.missed == "catch_up" and since is not None:
        slots = schedule.newest(since, latest, schedule.catch_up_limit)
        missed = schedule.between(since, slots[0])  # older than the bound lets through
    else:
        slots = [latest]
        missed = schedule.between(since, latest) if since is not None else Gap()
    scheduled = 0
    expected: object = last
    for index, slot in enumerate(slots):
        wanted = slot_id(task_class, slot)
        stored = await build_task(task_class, slot).push(run_at=slot, task_id=wanted)
        if not await store.advance_schedule(collection, key, expected, slot, schedule.describe(), now):
            return scheduled, False  # another scheduler moved the cursor first
        expected = slot
        if index == 0:
            _report_missed(task_class, schedule, slots, missed)
        if stored.id != wanted:
            log.info(
                "%s: slot %s skipped, task %s with the same dedupe_key is in flight",
                task_class.__name__,
                slot.isoformat(),
                stored.id,
            )
            continue
        log.info("%s: scheduled task %s for slot %s", task_class.__name__, wanted, slot.isoformat())
        scheduled += 1
    return scheduled, True


def _report_missed(task_class: type[Task], schedule: Schedule, slots: list[datetime], missed: Gap) -> None:
    """Log what this tick does about missed slots, once: only the scheduler that moved the cursor calls it."""
    name = task_class.__name__
    if schedule.missed == "skip":
        if missed.count:
            log.warning(
                "%s: skipped %s; scheduled only the latest slot, %s (missed='skip')",
                name,
                missed.describe(),
                _iso(slots[-1]),
            )
        return
    if missed.count:
        log.warning(
            "%s: catch_up_limit=%d dropped %s; catching up the %d slots from %s to %s",
            name,
            schedule.catch_up_limit,
            missed.describe(),
            len(slots),
            _iso(slots[0]),
            _iso(slots[-1]),
        )
    elif len(slots) > 1:
        log.info("%s: catching up %d missed slots from %s to %s", name, len(slots) - 1, _iso(slots[0]), _iso(slots[-2]))


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
