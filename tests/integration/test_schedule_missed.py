"""A tick that runs late: the ``missed`` policy of a periodic class, skip (logged) or catch up (bounded).

The catch-up classes are defined inside their tests, so each test stands or falls alone.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from beanie_tasks import Task
from beanie_tasks.driver import collection_of
from beanie_tasks.schedule import CURSOR_COLLECTION, schedule_key, slot_id, tick

T0 = datetime(2024, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
FIVE = timedelta(minutes=5)
MINUTE = timedelta(minutes=1)
LATE = timedelta(seconds=1)
LOGGER = "beanie_tasks.schedule"


class Report(Task):
    """Every five minutes, with the default policy (skip)."""

    class TaskSettings:
        cron = "*/5 * * * *"


def iso(slot: datetime) -> str:
    return slot.isoformat()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def scheduled_order(caplog: pytest.LogCaptureFixture, task_class: type[Task]) -> list[str]:
    """The slots ``task_class`` was scheduled for, in the order the log says they were pushed."""
    prefix = f"{task_class.__name__}: scheduled task "
    return [r.getMessage().rsplit(" ", 1)[1] for r in caplog.records if r.getMessage().startswith(prefix)]


async def run_ats(task_class: type[Task]) -> list[datetime | None]:
    return [t.run_at for t in await task_class.find_all().sort("run_at").to_list()]


async def cursor_slot(task_class: type[Task]) -> datetime:
    cursor = await collection_of(task_class).database[CURSOR_COLLECTION].find_one({"_id": schedule_key(task_class)})
    assert cursor is not None
    slot: datetime = cursor["last_slot"]
    return slot.replace(tzinfo=timezone.utc)


# ------------------------------------------------------------------ skip


async def test_skip_logs_each_skipped_slot(init_tasks: Any, caplog: pytest.LogCaptureFixture) -> None:
    await init_tasks(Report)
    caplog.set_level(logging.INFO, logger=LOGGER)
    await tick([Report], T0)
    assert await tick([Report], T0 + 3 * FIVE + LATE) == 1  # 12:05 and 12:10 missed
    assert await run_ats(Report) == [T0 + 3 * FIVE]
    (warning,) = warnings(caplog)
    assert f"skipped 2 missed slots ({iso(T0 + FIVE)}, {iso(T0 + 2 * FIVE)})" in warning
    assert f"scheduled only the latest slot, {iso(T0 + 3 * FIVE)}" in warning

    # A long outage: one line with the first and last skipped slots and the count.
    caplog.clear()
    assert await tick([Report], T0 + 3 * FIVE + timedelta(hours=2) + LATE) == 1
    (warning,) = warnings(caplog)
    assert f"skipped 23 missed slots, the first {iso(T0 + 4 * FIVE)} and the last {iso(T0 + 26 * FIVE)}" in warning
    assert iso(T0 + 5 * FIVE) not in warning
    assert await run_ats(Report) == [T0 + 3 * FIVE, T0 + 27 * FIVE]

    # On time again: nothing to say.
    caplog.clear()
    assert await tick([Report], T0 + 28 * FIVE + LATE) == 1
    assert warnings(caplog) == []


async def test_racing_schedulers_skip_store_each_slot_once(init_tasks: Any, caplog: pytest.LogCaptureFixture) -> None:
    await init_tasks(Report)
    await tick([Report], T0)
    now = T0 + 4 * FIVE + LATE
    assert sum(await asyncio.gather(*(tick([Report], now) for _ in range(5)))) == 1
    assert await run_ats(Report) == [T0 + 4 * FIVE]
    logged = warnings(caplog)
    assert len(logged) == 1, f"only the scheduler that moved the cursor reports the skipped slots: {logged}"
    assert f"skipped 3 missed slots ({iso(T0 + FIVE)}, {iso(T0 + 2 * FIVE)}, {iso(T0 + 3 * FIVE)})" in logged[0]


# ------------------------------------------------------------------ catch up


async def test_catch_up_schedules_every_missed_slot_in_order(init_tasks: Any, caplog: pytest.LogCaptureFixture) -> None:
    class Backfill(Task):
        class TaskSettings:
            cron = "*/5 * * * *"
            missed = "catch_up"

    await init_tasks(Backfill)
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert await tick([Backfill], T0 + LATE) == 0  # a brand-new schedule starts after now: no history
    assert await run_ats(Backfill) == []
    assert await tick([Backfill], T0 + 4 * FIVE + LATE) == 4
    slots = [T0 + n * FIVE for n in (1, 2, 3, 4)]
    assert await run_ats(Backfill) == slots
    assert scheduled_order(caplog, Backfill) == [iso(slot) for slot in slots], "oldest first"
    assert {t.id for t in await Backfill.find_all().to_list()} == {slot_id(Backfill, slot) for slot in slots}
    assert await cursor_slot(Backfill) == slots[-1]
    assert warnings(caplog) == [], "nothing was dropped"
    # Back on time: one slot per tick again, none repeated.
    assert await tick([Backfill], T0 + 5 * FIVE + LATE) == 1
    assert await tick([Backfill], T0 + 5 * FIVE + 2 * LATE) == 0
    assert await run_ats(Backfill) == [*slots, T0 + 5 * FIVE]


async def test_catch_up_respects_the_bound_and_says_so(init_tasks: Any, caplog: pytest.LogCaptureFixture) -> None:
    class Bounded(Task):
        class TaskSettings:
            every = 60
            missed = "catch_up"
            catch_up_limit = 3

    await init_tasks(Bounded)
    caplog.set_level(logging.INFO, logger=LOGGER)
    await tick([Bounded], T0)
    # 12:01 .. 12:10 are due: the newest three are scheduled, the seven before them dropped.
    assert await tick([Bounded], T0 + 10 * MINUTE + LATE) == 3
    kept = [T0 + n * MINUTE for n in (8, 9, 10)]
    assert await run_ats(Bounded) == kept
    assert scheduled_order(caplog, Bounded) == [iso(slot) for slot in kept]
    (warning,) = warnings(caplog)
    dropped = ", ".join(iso(T0 + n * MINUTE) for n in range(1, 8))
    assert f"catch_up_limit=3 dropped 7 missed slots ({dropped})" in warning
    assert f"catching up the 3 slots from {iso(kept[0])} to {iso(kept[-1])}" in warning

    # A longer gap: the warning names the first and last dropped slots and the count.
    caplog.clear()
    assert await tick([Bounded], T0 + 60 * MINUTE + LATE) == 3
    (warning,) = warnings(caplog)
    assert f"dropped 47 missed slots, the first {iso(T0 + 11 * MINUTE)} and the last {iso(T0 + 57 * MINUTE)}" in warning
    assert await run_ats(Bounded) == [*kept, *(T0 + n * MINUTE for n in (58, 59, 60))]


async def test_racing_schedulers_catch_up_store_each_slot_once(init_tasks: Any) -> None:
    class Racing(Task):
        class TaskSettings:
            every = 60
            missed = "catch_up"

    await init_tasks(Racing)
    await tick([Racing], T0)
    # Five schedulers, two of them a little ahead of the others, all behind since 12:00.
    early, later = T0 + 4 * MINUTE + LATE, T0 + 6 * MINUTE + LATE
    counts = await asyncio.gather(*(tick([Racing], now) for now in (early, later, early, later, early)))
    slots = [T0 + n * MINUTE for n in range(1, 7)]
    assert sum(counts) == len(slots), counts
    assert await run_ats(Racing) == slots
    assert await cursor_slot(Racing) == slots[-1]
    assert await tick([Racing], later) == 0
