"""Periodic schedules without a database: slot arithmetic and the checks made at import."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from beanie_tasks import Task
from beanie_tasks.schedule import COUNT_LIMIT, Schedule

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


@pytest.mark.parametrize(
    ("policy", "limit", "error"),
    [
        ("later", 100, "TaskSettings.missed must be 'skip' or 'catch_up', got 'later'"),
        (None, 100, "TaskSettings.missed must be 'skip' or 'catch_up', got None"),
        ("catch_up", 0, "TaskSettings.catch_up_limit must be a whole number from 1 to 10000, got 0"),
        ("catch_up", 2.5, "TaskSettings.catch_up_limit must be a whole number from 1 to 10000, got 2.5"),
        ("catch_up", True, "TaskSettings.catch_up_limit must be a whole number from 1 to 10000, got True"),
        ("skip", 10_001, "TaskSettings.catch_up_limit must be a whole number from 1 to 10000, got 10001"),
    ],
)
def test_a_bad_missed_policy_fails_at_import_in_one_line(policy: object, limit: object, error: str) -> None:
    with pytest.raises(ValueError) as raised:

        class Late(Task):
            class TaskSettings:
                cron = "*/5 * * * *"
                missed = policy
                catch_up_limit = limit

    assert str(raised.value) == error


def test_missed_policy_defaults_and_inheritance() -> None:
    class Backfill(Report):
        class TaskSettings:
            missed = "catch_up"
            catch_up_limit = 24

    assert (Report.task_options.missed, Report.task_options.catch_up_limit) == ("skip", 100)
    assert Schedule.of(Backfill) == Schedule(cron="*/5 * * * *", missed="catch_up", catch_up_limit=24)


@pytest.mark.parametrize("schedule", [Schedule(cron="*/5 * * * *"), Schedule(every=300)], ids=["cron", "every"])
def test_missed_slots_between_two_times(schedule: Schedule) -> None:
    five = timedelta(minutes=5)
    assert schedule.between(T0, T0 + five).count == 0
    gap = schedule.between(T0, T0 + 3 * five + timedelta(seconds=1))  # strictly between: 12:05 .. 12:15
    assert (gap.count, gap.slots) == (3, (T0 + five, T0 + 2 * five, T0 + 3 * five))
    long = schedule.between(T0, T0 + 12 * five)
    assert (long.count, long.first, long.last, long.slots) == (11, T0 + five, T0 + 11 * five, ())
    assert (
        long.describe()
        == f"11 missed slots, the first {(T0 + five).isoformat()} and the last {(T0 + 11 * five).isoformat()}"
    )
    huge = schedule.between(T0, T0 + (COUNT_LIMIT + 5) * five)
    assert huge.last == T0 + (COUNT_LIMIT + 4) * five
    assert (huge.count, huge.at_least) == ((COUNT_LIMIT, True) if schedule.cron else (COUNT_LIMIT + 4, False))
    assert schedule.newest(T0, T0 + 3 * five, 2) == [T0 + 2 * five, T0 + 3 * five]
    assert schedule.newest(T0, T0 + 3 * five, 100) == [T0 + five, T0 + 2 * five, T0 + 3 * five]
    assert schedule.newest(T0, T0 + five - timedelta(seconds=1), 100) == []
