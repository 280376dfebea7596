"""The measured clock offset: no more skew than one reading can show (``clock.record``)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from beanie_tasks import clock


class Client:
    """Any object a weak reference can point to stands for a client."""


START = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)


def measured(round_trip_ms: float, server_after_midpoint_ms: float) -> timedelta:
    before, after = START, START + timedelta(milliseconds=round_trip_ms)
    server = before + (after - before) / 2 + timedelta(milliseconds=server_after_midpoint_ms)
    return clock.record(Client(), before, server, after)


def test_a_reading_within_the_round_trip_is_no_skew() -> None:
    # A loaded host: 300 ms round trips, the server read 120 ms after the midpoint; same host, same clock.
    assert measured(300, 120) == timedelta(0)
    assert measured(300, -149) == timedelta(0)
    assert measured(2, 4) == timedelta(0)  # under 5 ms is never a skew


def test_a_real_skew_is_kept_less_what_the_round_trip_cannot_tell() -> None:
    assert measured(200, 5_000) == timedelta(milliseconds=4_900)
    assert measured(200, -5_000) == timedelta(milliseconds=-4_900)
    assert measured(1, 300_000) == timedelta(milliseconds=299_995)
