"""Periodic tasks: slots from cron or an interval, one task per slot, resuming after a crash."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from beanie_tasks import State, Task
from beanie_tasks.driver import collection_of
from beanie_tasks.schedule import (
    CURSOR_COLLECTION,
    Schedule,
    ScheduleError,
    run_schedules,
    schedule_key,
    scheduled_classes,
    slot_id,
    tick,
)

T0 = datetime(2024, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


class Report(Task):
    """Every five minutes, by cron."""

    kind: str = "report"

    class TaskSettings:
        cron = "*/5 * * * *"


class Cleanup(Task):
    """Every 90 seconds, by interval."""

    class TaskSettings:
        every = timedelta(seconds=90)


class Daily(Task):
    day: str

    class TaskSettings:
        cron = "0 3 * * *"

    @classmethod
    def for_slot(cls, slot: datetime) -> Daily:
        return cls(day=slot.date().isoformat())


class Plain(Task):
    pass


class EverySecond(Task):
    class TaskSettings:
        every = 1


class Unbuildable(Task):
    class TaskSettings:
        every = 1

    @classmethod
    def for_slot(cls, slot: datetime) -> Unbuildable:
        raise RuntimeError("no data for this slot")


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Report, Cleanup, Daily, Plain, EverySecond, Unbuildable)


async def stored(task_class: type[Task]) -> list[Task]:
    return await task_class.find_all().sort("run_at").to_list()


def test_a_class_that_cannot_be_built_fails_early() -> None:
    class NeedsInput(Task):
        to: str

        class TaskSettings:
            every = 60

    with pytest.raises(ScheduleError, match="NeedsInput cannot be built"):
        scheduled_classes([NeedsInput])
    assert scheduled_classes([Plain, Report]) == [Report]


# ------------------------------------------------------------------ ticks


async def test_series_starts_after_first_sighting_then_one_task_per_slot() -> None:
    assert await tick([Report, Cleanup, Plain], T0 + timedelta(seconds=30)) == 0  # cursors created
    assert await stored(Report) == []
    assert await tick([Report], T0 + timedelta(minutes=4)) == 0  # still the same slot
    slot = T0 + timedelta(minutes=5)
    assert await tick([Report], slot + timedelta(seconds=1)) == 1
    assert await tick([Report], slot + timedelta(seconds=2)) == 0
    tasks = await stored(Report)
    assert len(tasks) == 1
    assert tasks[0].id == slot_id(Report, slot) and tasks[0].run_at == slot and tasks[0].state is State.CREATED


async def test_interval_series() -> None:
    schedule = Schedule(every=90)
    start = schedule.latest(T0)
    await tick([Cleanup], start)
    for n in (1, 2, 3):
        assert await tick([Cleanup], start + timedelta(seconds=90 * n + 5)) == 1
    assert [t.run_at for t in await stored(Cleanup)] == [start + timedelta(seconds=90 * n) for n in (1, 2, 3)]


async def test_concurrent_ticks_store_one_task_per_slot() -> None:
    await tick([Report], T0)
    now = T0 + timedelta(minutes=5, seconds=3)
    scheduled = await asyncio.gather(*(tick([Report], now) for _ in range(5)))
    assert sum(scheduled) == 1
    assert len(await stored(Report)) == 1


async def test_missed_slots_are_coalesced_into_the_latest() -> None:
    await tick([Report], T0)
    assert await tick([Report], T0 + timedelta(hours=1, minutes=2)) == 1
    assert [t.run_at for t in await stored(Report)] == [T0 + timedelta(hours=1)]


async def test_for_slot_builds_the_task() -> None:
    await tick([Daily], T0)
    assert await tick([Daily], T0 + timedelta(days=1)) == 1
    (task,) = await stored(Daily)
    assert isinstance(task, Daily) and task.day == "2024-01-02"


async def test_a_crash_after_the_push_does_not_end_the_series(monkeypatch: pytest.MonkeyPatch) -> None:
    await tick([Report], T0)
    cursors = collection_of(Report).database[CURSOR_COLLECTION]
    real_update = type(cursors).update_one

    async def crash(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("worker died before advancing the cursor")

    monkeypatch.setattr(type(cursors), "update_one", crash)
    first = T0 + timedelta(minutes=5)
    with pytest.raises(ConnectionError):
        await tick([Report], first + timedelta(seconds=1))
    monkeypatch.setattr(type(cursors), "update_one", real_update)

    # The same slot again (the pushed task is not duplicated), then the next ones.
    assert await tick([Report], first + timedelta(seconds=2)) == 1
    assert await tick([Report], first + timedelta(minutes=5)) == 1
    assert [t.run_at for t in await stored(Report)] == [first, first + timedelta(minutes=5)]
    cursor = await cursors.find_one({"_id": schedule_key(Report)})
    assert cursor is not None and cursor["last_slot"].replace(tzinfo=timezone.utc) == first + timedelta(minutes=5)


async def test_a_finished_slot_task_is_not_pushed_again() -> None:
    await tick([Report], T0)
    slot = T0 + timedelta(minutes=5)
    await tick([Report], slot)
    task = await Report.pop()
    assert task is not None
    await task.finish()
    assert await tick([Report], slot + timedelta(minutes=1)) == 0
    assert len(await stored(Report)) == 1


async def test_run_schedules_runs_in_the_background_until_stopped(caplog: pytest.LogCaptureFixture) -> None:
    stop = asyncio.Event()
    runner = asyncio.create_task(run_schedules([Plain, Unbuildable, EverySecond], stop))
    try:
        for _ in range(200):
            if await EverySecond.find_all().count() >= 2:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
    slots = [t.run_at for t in await stored(EverySecond)]
    assert len(slots) >= 2 and len(set(slots)) == len(slots)
    assert all(slot is not None and slot.microsecond == 0 for slot in slots)
    # A class that cannot build its task is reported and does not stop the others.
    assert await Unbuildable.find_all().count() == 0
    assert "Unbuildable cannot be built" in caplog.text and "no data for this slot" in caplog.text
