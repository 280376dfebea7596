"""Backoff: exponential growth, a cap, and jitter that only ever shortens the delay."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from beanie_tasks import Backoff


def test_without_jitter_the_delay_doubles_from_base_up_to_the_cap() -> None:
    backoff = Backoff(base=1.0, factor=2.0, maximum=10.0, jitter=0.0)
    delays = [backoff.delay(n).total_seconds() for n in range(1, 7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_zero_failures_waits_the_base_delay() -> None:
    assert Backoff(base=3.0, jitter=0.0).delay(0) == timedelta(seconds=3)


def test_jitter_stays_within_the_randomised_fraction() -> None:
    backoff = Backoff(base=4.0, factor=2.0, maximum=100.0, jitter=0.5)
    rng = random.Random(7)
    for failures in range(1, 6):
        raw = 4.0 * 2 ** (failures - 1)
        seen = [backoff.delay(failures, rng).total_seconds() for _ in range(200)]
        assert all(raw * 0.5 <= s <= raw for s in seen)
        assert max(seen) - min(seen) > raw * 0.3, "jitter should spread the delays"


def test_full_jitter_can_reach_zero_but_never_exceeds_the_raw_delay() -> None:
    backoff = Backoff(base=2.0, jitter=1.0)
    rng = random.Random(1)
    seen = [backoff.delay(1, rng).total_seconds() for _ in range(500)]
    assert 0.0 <= min(seen) < 0.1 and max(seen) <= 2.0


def test_huge_failure_counts_do_not_overflow() -> None:
    backoff = Backoff(base=1.0, factor=10.0, maximum=60.0, jitter=0.0)
    assert backoff.delay(10_000) == timedelta(seconds=60)


def test_same_seed_same_delays() -> None:
    backoff = Backoff()
    first = [backoff.delay(n, random.Random(3)) for n in range(1, 5)]
    second = [backoff.delay(n, random.Random(3)) for n in range(1, 5)]
    assert first == second


@pytest.mark.parametrize(
    "kwargs",
    [{"base": -1.0}, {"maximum": -1.0}, {"factor": 0.5}, {"jitter": -0.1}, {"jitter": 1.5}],
)
def test_bad_parameters_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)
