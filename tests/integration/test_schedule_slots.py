"""Periodic schedules without a database: slot arithmetic and the checks made at import."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from beanie_tasks import Task
from beanie_tasks.schedule import Schedule

T0 = datetime(2024, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


class Report(Task):
    class TaskSettings:
        cron = "*/5 * * * *"


class Cleanup(Task):
    class TaskSettings:
        every = timedelta(seconds=90)


class Plain(Task):
    pass


def test_cron_slots() -> None:
    schedule = Schedule(cron="*/5 * * * *")
    assert schedule.latest(T0) == T0
    assert schedule.latest(T0 + timedelta(minutes=4, seconds=59)) == T0
    assert schedule.following(T0) == T0 + timedelta(minutes=5)
    assert schedule.latest(T0).tzinfo is not None


def test_interval_slots_are_aligned_to_the_epoch() -> None:
    schedule = Schedule(every=90)
    slot = schedule.latest(T0 + timedelta(seconds=10))
    assert slot <= T0 + timedelta(seconds=10) < slot + timedelta(seconds=90)
    assert slot.timestamp() % 90 == 0
    assert schedule.following(slot) == slot + timedelta(seconds=90)
    assert schedule.latest(slot) == slot


def test_schedule_settings_are_checked_at_import() -> None:
    with pytest.raises(ValueError, match="valid cron expression"):

        class BadCron(Task):
            class TaskSettings:
                cron = "every tuesday"

    with pytest.raises(ValueError, match="either cron or every"):

        class Both(Task):
            class TaskSettings:
                cron = "* * * * *"
                every = 60

    with pytest.raises(ValueError, match="at least 1 second"):

        class TooFast(Task):
            class TaskSettings:
                every = 0.5

    assert Schedule.of(Plain) is None
    assert Cleanup.task_options.every == 90.0
