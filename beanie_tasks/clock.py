"""Time: UTC helpers, and the server's clock that every lease and due time is measured on.

Hosts disagree about the time. A worker whose clock runs ahead would think healthy
leases had expired and claim tasks before they are due, so the queue never trusts a
client's wall clock on its own: each client measures its offset from the server (the
``localTime`` of ``hello``), and ``now(collection)`` is the local clock corrected by it.
The offset is measured when ``init_beanie`` registers a task class and refreshed by
consumers every ``RESYNC_EVERY`` seconds; an offset over ``WARN_OFFSET`` is logged.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

from pydantic import AfterValidator

from beanie_tasks import driver
from beanie_tasks.redact import get_logger

log = get_logger("beanie_tasks.clock")

# A task that may not be claimed yet (it waits for dependencies) is parked here, so the
# claim filter never needs a second condition and stays served by one index.
FAR_FUTURE = datetime(9999, 12, 31, tzinfo=timezone.utc)
RESYNC_EVERY = 60.0
WARN_OFFSET = timedelta(seconds=2)


def local_now() -> datetime:
    """This host's wall clock, in UTC: the only place the library reads it."""
    return datetime.now(timezone.utc)


def to_millis(value: datetime) -> datetime:
    """Truncate to the millisecond BSON stores, so a value written compares equal when read back."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def as_utc(value: datetime) -> datetime:
    """BSON dates are UTC; a client without ``tz_aware`` hands them back naive."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]


@dataclass
class Offset:
    """How far the server's clock is ahead of this host's, and when that was measured."""

    delta: timedelta
    measured_at: float


# Keyed by the client object itself (clients to one server compare equal, but each is
# measured on its own), holding a weak reference so a closed client's entry goes stale.
_offsets: dict[int, tuple[weakref.ref[Any], Offset]] = {}


def client_of(collection: Any) -> Any:
    return collection.database.client


def _known(client: Any) -> Offset | None:
    entry = _offsets.get(id(client))
    if entry is None or entry[0]() is not client:
        return None
    return entry[1]


def offset(collection: Any | None) -> timedelta:
    """The last measured offset of the client behind ``collection`` (zero before any)."""
    if collection is None:
        return timedelta(0)
    known = _known(client_of(collection))
    return known.delta if known is not None else timedelta(0)


def now(collection: Any | None = None) -> datetime:
    """The server's time as this client knows it, truncated to the millisecond."""
    return now_of(client_of(collection) if collection is not None else None)


def now_of(client: Any) -> datetime:
    """``now()`` for the client behind a collection, when the caller holds the client (a store does).

    Called on every claim and transition, so it does in one call what ``offset`` and
    ``to_millis`` do.
    """
    value = local_now()
    entry = _offsets.get(id(client)) if client is not None else None
    if entry is not None and entry[0]() is client:
        value += entry[1].delta
    return value.replace(microsecond=value.microsecond - value.microsecond % 1000)


def utcnow() -> datetime:
    """This host's time, truncated to the millisecond (for values that decide nothing on the server)."""
    value = local_now()  # every new task reads it: ``to_millis`` done in place
    return value.replace(microsecond=value.microsecond - value.microsecond % 1000)


async def sync(collection: Any) -> timedelta:
    """Measure the client's offset from the server now; warn when it is large."""
    before = local_now()
    server_time = await driver.server_time(collection)
    return record(client_of(collection), before, server_time, local_now())


def record(client: Any, before: datetime, server_time: datetime | None, after: datetime) -> timedelta:
    """Keep the offset of ``client`` from a ``server_time`` read between ``before`` and ``after``; warn when large.

    ``sync`` measures it for async clients; ``beanie_tasks.sync`` for its PyMongo client.
    """
    if server_time is None:  # an in-process backend: its clock is this host's
        delta = timedelta(0)
    else:
        delta = as_utc(server_time) - (before + (after - before) / 2)
        # The server read its clock somewhere in the round trip: the true offset is within half of
        # it either way. Keep the smallest offset the reading allows, so two processes on one
        # host (a loaded one, whose round trips are long) never believe in skews they do not have.
        uncertainty = max((after - before) / 2, timedelta(milliseconds=5))
        if abs(delta) <= uncertainty:
            delta = timedelta(0)
        else:
            delta -= uncertainty if delta > timedelta(0) else -uncertainty
    previous = _known(client)
    with contextlib.suppress(TypeError):  # a client type without weak references is measured each time
        _offsets[id(client)] = (weakref.ref(client), Offset(delta, time.monotonic()))
    if abs(delta) > WARN_OFFSET and (previous is None or abs(previous.delta - delta) > WARN_OFFSET):
        log.warning(
            "this host's clock is %+.1f s off the MongoDB server's; leases and due times use the server's clock "
            "(fix the host's time sync: NTP)",
            -delta.total_seconds(),
        )
    return delta


def is_stale(collection: Any) -> bool:
    """Whether the offset of the client behind ``collection`` is unknown or older than ``RESYNC_EVERY``."""
    known = _known(client_of(collection))
    return known is None or time.monotonic() - known.measured_at >= RESYNC_EVERY


async def refresh(collection: Any) -> None:
    """Re-measure the offset when it is older than ``RESYNC_EVERY`` (no command otherwise)."""
    if is_stale(collection):
        await sync(collection)


def short_age(seconds: float) -> str:
    """``95`` -> ``1m 35s``: an age for tables (the CLI's status, the dashboard), its two largest units."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(hours) + [f"{minutes}m"] * bool(minutes)
    return " ".join([*parts, f"{secs}s"][:2])
