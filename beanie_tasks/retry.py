"""Exponential backoff with jitter, so retried tasks do not stampede together."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt ``n + 1`` after ``n`` failures: ``base * factor**(n-1)``, capped.

    ``jitter`` is the fraction of the delay that is randomised (0 = none, 1 = full
    jitter), which spreads out retries of tasks that failed together.
    """

    base: float = 1.0
    factor: float = 2.0
    maximum: float = 300.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.base < 0 or self.maximum < 0:
            raise ValueError("Backoff base and maximum must be >= 0 seconds")
        if self.factor < 1:
            raise ValueError("Backoff factor must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("Backoff jitter must be between 0 and 1")

    def delay(self, failures: int, rng: random.Random | None = None) -> timedelta:
        exponent = max(failures - 1, 0)
        try:
            raw = min(self.maximum, self.base * self.factor**exponent)
        except OverflowError:
            raw = self.maximum
        spread = raw * self.jitter
        draw = (rng or random).random()
        return timedelta(seconds=raw - spread + spread * draw)
