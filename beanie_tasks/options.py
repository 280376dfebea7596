"""Per-class queue settings, declared in a nested ``TaskSettings`` class and checked at import."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from croniter import croniter

from beanie_tasks.retry import Backoff

Seconds = float
# What a scheduler does with the slots it finds it missed (a worker was down, a long pause).
MissedPolicy = Literal["skip", "catch_up"]
MISSED_POLICIES: tuple[MissedPolicy, ...] = ("skip", "catch_up")
# The most slots one catch-up may schedule: each is a push and a cursor update, one after
# the other, so a higher bound would let a single tick run for minutes.
MAX_CATCH_UP = 10_000
EXECUTORS = ("thread", "process")


def _seconds(name: str, value: Any, *, allow_none: bool = False) -> Seconds | None:
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"TaskSettings.{name} must be a number of seconds, not None")
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"TaskSettings.{name} must be seconds or a timedelta, got {value!r}")
    if value <= 0:
        raise ValueError(f"TaskSettings.{name} must be > 0, got {value!r}")
    return float(value)


def _check_schedule(options: TaskOptions) -> None:
    """A periodic class declares either ``cron`` or ``every``; both are checked at import."""
    if options.cron is not None:
        if not isinstance(options.cron, str) or not croniter.is_valid(options.cron):
            raise ValueError(
                f"TaskSettings.cron must be a valid cron expression (croniter syntax), got {options.cron!r}"
            )
        if options.every is not None:
            raise ValueError("TaskSettings: declare either cron or every, not both")
    if options.every is not None:
        every = _seconds("every", options.every)
        if every is not None and every < 1:
            raise ValueError(f"TaskSettings.every must be at least 1 second, got {every!r}")
        object.__setattr__(options, "every", every)
    if options.missed not in MISSED_POLICIES:
        raise ValueError(f"TaskSettings.missed must be 'skip' or 'catch_up', got {options.missed!r}")
    limit = options.catch_up_limit
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_CATCH_UP:
        raise ValueError(f"TaskSettings.catch_up_limit must be a whole number from 1 to {MAX_CATCH_UP}, got {limit!r}")


_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE_TEXT = re.compile(r"^\s*(\d+)\s*/\s*(\d*\.?\d*)\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class RateLimit:
    """At most ``count`` task starts per ``per`` seconds (a fixed window, aligned to the epoch)."""

    count: int
    per: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"a rate limit needs a whole count >= 1, got {self.count!r}")
        if isinstance(self.per, bool) or not isinstance(self.per, (int, float)) or not self.per > 0:
            raise ValueError(f"a rate limit window must be > 0 seconds, got {self.per!r}")

    @classmethod
    def parse(cls, name: str, value: Any) -> RateLimit | None:
        """Accept ``RateLimit``, ``"10/s"``, ``"100/m"``, ``"5/2s"``, ``"3/h"`` or ``(count, seconds)``."""
        if value is None or isinstance(value, RateLimit):
            return value
        if isinstance(value, str):
            match = _RATE_TEXT.match(value.lower())
            if match is None or match.group(3) not in _UNITS:
                raise ValueError(f"TaskSettings.{name} {value!r} is not a rate like '10/s', '100/m', '5/2s' or '3/h'")
            multiple = float(match.group(2)) if match.group(2) else 1.0
            return cls(int(match.group(1)), multiple * _UNITS[match.group(3)])
        if isinstance(value, tuple) and len(value) == 2:
            per = value[1].total_seconds() if isinstance(value[1], timedelta) else value[1]
            try:
                return cls(value[0], per)
            except ValueError as exc:
                raise ValueError(f"TaskSettings.{name}: {exc}") from None
        raise TypeError(
            f"TaskSettings.{name} must be a RateLimit, a string like '10/s' or (count, seconds), got {value!r}"
        )

    def window(self, now: float) -> tuple[int, float]:
        """The index of the window ``now`` falls in, and the epoch second it ends."""
        index = math.floor(now / self.per)
        return index, (index + 1) * self.per

    def __str__(self) -> str:
        return f"{self.count}/{self.per:g}s"


def _exception_types(name: str, value: Any) -> tuple[type[BaseException], ...] | None:
    """``retry_on`` / ``dont_retry_on``: None, one exception class, or a tuple of them."""
    if value is None:
        return None
    types = value if isinstance(value, (tuple, list, frozenset, set)) else (value,)
    for item in types:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise TypeError(f"TaskSettings.{name} must be exception classes (such as TimeoutError), got {item!r}")
    return tuple(types)


def _check_limits(options: TaskOptions) -> None:
    for name in ("concurrency", "key_concurrency"):
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"TaskSettings.{name} must be a whole number >= 1, got {value!r}")
    for name in ("rate_limit", "key_rate_limit"):
        object.__setattr__(options, name, RateLimit.parse(name, getattr(options, name)))


@dataclass(frozen=True)
class TaskOptions:
    """The resolved settings of one task class (see ``docs/settings.md``)."""

    visibility_timeout: Seconds = 60.0
    heartbeat_interval: Seconds | None = None
    max_attempts: int = 1
    # A task whose lease expires (its worker died or stalled) is delivered again this many
    # times, on top of max_attempts, before it ends FAILED; 0 makes a lost lease final.
    max_redeliveries: int = 3
    # How a plain ``def run()`` runs: in a worker thread, or in a child process the worker can kill.
    executor: str = "thread"
    backoff: Backoff = field(default_factory=Backoff)
    timeout: Seconds | None = None
    ttl: Seconds | None = None
    poll_interval: Seconds = 0.5
    recovery_interval: Seconds = 5.0
    # Periodic tasks (schedule.py): a cron expression (UTC, croniter syntax) or a fixed interval.
    cron: str | None = None
    every: Seconds | None = None
    # Slots a late tick finds missed: "skip" schedules only the latest and logs the rest,
    # "catch_up" schedules each one, oldest first, at most ``catch_up_limit`` (the newest ones).
    missed: MissedPolicy = "skip"
    catch_up_limit: int = 100
    # Worker and limits (worker.py, limits.py): runs of this class at once in one worker,
    # a class-wide start rate, a start rate per ``rate_limit_key``, a RUNNING cap per ``concurrency_key``.
    concurrency: int | None = None
    rate_limit: RateLimit | str | tuple[int, float] | None = None
    key_rate_limit: RateLimit | str | tuple[int, float] | None = None
    key_concurrency: int | None = None
    # Sharding (store.py): the field that leads the claim and dedupe indexes, usable as a shard key.
    partition_by: str | None = None
    # Retry filters: only exceptions of ``retry_on`` types are retried (None: every one), and
    # ``dont_retry_on`` types never are (checked first); any other failure ends FAILED at once.
    retry_on: tuple[type[BaseException], ...] | None = None
    dont_retry_on: tuple[type[BaseException], ...] | None = None

    def __post_init__(self) -> None:
        for name in ("visibility_timeout", "poll_interval", "recovery_interval"):
            object.__setattr__(self, name, _seconds(name, getattr(self, name)))
        for name in ("heartbeat_interval", "timeout", "ttl"):
            object.__setattr__(self, name, _seconds(name, getattr(self, name), allow_none=True))
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise TypeError(f"TaskSettings.max_attempts must be an int, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ValueError("TaskSettings.max_attempts must be >= 1")
        if isinstance(self.max_redeliveries, bool) or not isinstance(self.max_redeliveries, int):
            raise TypeError(f"TaskSettings.max_redeliveries must be an int, got {self.max_redeliveries!r}")
        if self.max_redeliveries < 0:
            raise ValueError("TaskSettings.max_redeliveries must be >= 0")
        if self.executor not in EXECUTORS:
            raise ValueError(f"TaskSettings.executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if not isinstance(self.backoff, Backoff):
            raise TypeError("TaskSettings.backoff must be a beanie_tasks.Backoff")
        if self.heartbeat_interval is not None and self.heartbeat_interval >= self.visibility_timeout:
            raise ValueError("TaskSettings.heartbeat_interval must be shorter than visibility_timeout")
        if self.partition_by is not None and (not isinstance(self.partition_by, str) or not self.partition_by):
            raise TypeError(f"TaskSettings.partition_by must name a field, got {self.partition_by!r}")
        _check_schedule(self)
        _check_limits(self)
        for name in ("retry_on", "dont_retry_on"):
            object.__setattr__(self, name, _exception_types(name, getattr(self, name)))

    def retries(self, error: BaseException | str | None) -> bool:
        """Whether a failed attempt that raised ``error`` may be retried under the class's filters.

        A worker's own timeout counts as a ``TimeoutError``; any other message without an
        exception (``fail("reason")``) is retried whatever the filters say.
        """
        if not isinstance(error, BaseException):
            return True
        if self.dont_retry_on is not None and isinstance(error, self.dont_retry_on):
            return False
        return self.retry_on is None or isinstance(error, self.retry_on)

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.visibility_timeout)

    @property
    def heartbeat_every(self) -> Seconds:
        return self.heartbeat_interval or self.visibility_timeout / 3

    @classmethod
    def resolve(cls, declared: type | None, inherited: TaskOptions | None) -> TaskOptions:
        """Overlay the attributes of a nested ``TaskSettings`` class on the parent's options."""
        base = inherited or cls()
        if declared is None:
            return base
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in vars(declared).items() if not k.startswith("_")}
        unknown = sorted(set(given) - names)
        if unknown:
            raise TypeError(f"Unknown TaskSettings option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return dataclasses.replace(base, **given)
