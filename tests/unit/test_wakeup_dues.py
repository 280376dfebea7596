"""Announced due times: each kept once, earliest first, at most MAX_DUES, parked tasks ignored, O(log n) per call."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import pytest

from beanie_tasks import wakeup
from beanie_tasks.clock import FAR_FUTURE
from beanie_tasks.wakeup import MAX_DUES, DueTimes, Wakeup

START = datetime(2030, 1, 1, tzinfo=timezone.utc)


class _Collection:
    """Enough of a collection for a Wakeup that never opens a stream."""

    def with_options(self, **_: Any) -> _Collection:
        return self


def a_wakeup() -> Wakeup:
    return Wakeup(_Collection(), use_change_stream=False, now=lambda: START)


class Counted(datetime):
    """A datetime that counts the comparisons made with it."""

    made: ClassVar[int] = 0

    def _count(self) -> None:
        Counted.made += 1

    def __lt__(self, other: Any) -> bool:
        self._count()
        return super().__lt__(other)

    def __le__(self, other: Any) -> bool:
        self._count()
        return super().__le__(other)

    def __gt__(self, other: Any) -> bool:
        self._count()
        return super().__gt__(other)

    def __ge__(self, other: Any) -> bool:
        self._count()
        return super().__ge__(other)

    def __eq__(self, other: object) -> bool:
        self._count()
        return super().__eq__(other)

    __hash__ = datetime.__hash__


def counted(seconds: float) -> Counted:
    return Counted.fromtimestamp(START.timestamp() + seconds, timezone.utc)


def test_due_times_come_out_earliest_first_each_once() -> None:
    dues = DueTimes()
    for seconds in (5, 1, 3, 1, 5, 2):
        dues.add(START + timedelta(seconds=seconds))
    assert len(dues) == 4
    assert dues.earliest() == START + timedelta(seconds=1)
    assert dues.latest() == START + timedelta(seconds=5)
    dues.drop_until(START + timedelta(seconds=2))
    assert len(dues) == 2 and dues.earliest() == START + timedelta(seconds=3)
    dues.drop_latest()
    assert len(dues) == 1 and dues.latest() == dues.earliest() == START + timedelta(seconds=3)
    dues.add(START + timedelta(seconds=5))  # dropped earlier, announced again: held again
    assert dues.latest() == START + timedelta(seconds=5) and START + timedelta(seconds=5) in dues


def test_churn_keeps_the_heaps_in_step_with_what_is_held() -> None:
    """Many adds and drops (the heaps rebuilt on the way) hold exactly what a plain set would."""
    dues, model = DueTimes(), set()
    for round_ in range(300):
        for step in range(40):
            due = START + timedelta(seconds=round_ * 7 + step % 13)
            dues.add(due)
            model.add(due)
        cut = START + timedelta(seconds=round_ * 7 + 3)
        dues.drop_until(cut)
        model = {d for d in model if d > cut}
        if round_ % 3 == 0:
            dues.drop_latest()
            model.discard(max(model))
        assert len(dues) == len(model)
        assert dues.earliest() == min(model) and dues.latest() == max(model)
        assert all(d in dues for d in model)


def test_a_parked_task_is_not_a_due_time() -> None:
    """A dependent waiting for its links, or a task waiting for a slot, is parked at FAR_FUTURE: never due."""
    waiter = a_wakeup()
    waiter.expect(FAR_FUTURE)
    waiter.expect(FAR_FUTURE + timedelta(hours=1))
    assert not waiter.expecting
    waiter.expect(START + timedelta(seconds=1))
    assert waiter.expecting


def test_past_max_dues_the_earliest_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wakeup, "MAX_DUES", 3)
    waiter = a_wakeup()
    for seconds in (10, 20, 30):
        waiter.expect(START + timedelta(seconds=seconds))
    assert not waiter.overflowed
    waiter.expect(START + timedelta(seconds=40))  # later than every one held: not remembered
    waiter.expect(START + timedelta(seconds=5))  # earlier: the latest (30) makes room
    assert waiter.overflowed
    assert len(waiter.dues) == 3
    assert waiter.dues.earliest() == START + timedelta(seconds=5)
    assert waiter.dues.latest() == START + timedelta(seconds=20)


def test_expect_costs_logarithmic_comparisons_with_max_dues_held() -> None:
    """With MAX_DUES times held, one more (which also evicts the latest) compares O(log n) times, not O(n)."""
    waiter = a_wakeup()
    for step in range(MAX_DUES):
        waiter.expect(counted(10 + step))
    assert len(waiter.dues) == MAX_DUES
    for due in (counted(1.5), counted(10 + MAX_DUES // 2 + 0.5), counted(10)):
        Counted.made = 0
        waiter.expect(due)
        assert Counted.made <= 120, f"{Counted.made} comparisons for one expect() over {MAX_DUES} due times"
