"""Per-class queue settings, declared in a nested ``TaskSettings`` class and checked at import."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from beanie_tasks.retry import Backoff

Seconds = float


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


@dataclass(frozen=True)
class TaskOptions:
    """The resolved settings of one task class (see ``docs/settings.md``)."""

    visibility_timeout: Seconds = 60.0
    heartbeat_interval: Seconds | None = None
    max_attempts: int = 1
    backoff: Backoff = field(default_factory=Backoff)
    timeout: Seconds | None = None
    ttl: Seconds | None = None
    poll_interval: Seconds = 0.5
    recovery_interval: Seconds = 5.0

    def __post_init__(self) -> None:
        for name in ("visibility_timeout", "poll_interval", "recovery_interval"):
            object.__setattr__(self, name, _seconds(name, getattr(self, name)))
        for name in ("heartbeat_interval", "timeout", "ttl"):
            object.__setattr__(self, name, _seconds(name, getattr(self, name), allow_none=True))
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise TypeError(f"TaskSettings.max_attempts must be an int, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ValueError("TaskSettings.max_attempts must be >= 1")
        if not isinstance(self.backoff, Backoff):
            raise TypeError("TaskSettings.backoff must be a beanie_tasks.Backoff")
        if self.heartbeat_interval is not None and self.heartbeat_interval >= self.visibility_timeout:
            raise ValueError("TaskSettings.heartbeat_interval must be shorter than visibility_timeout")

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
