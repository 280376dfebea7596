"""Rate and concurrency limits: the policy of a class, and what one process remembers about full keys.

Limits are enforced atomically in a small side collection every consumer shares (the
commands are in ``store``, inside the one claim function, so ``pop()``, ``queue()``,
batch claims and the worker all obey them):

* a **rate** is a fixed-window counter document per (class, key, window); one conditional
  ``$inc`` either takes a token or matches nothing (the window is full);
* a **concurrency cap** is a slot document per (class, ``concurrency_key``) holding the lease
  tokens of the tasks running under it; one conditional ``$push`` joins only while the
  array is shorter than the cap. A task leaving RUNNING gives its slot back.

Both are single atomic updates, so no two processes can both take the last token or slot.
A refused candidate is never touched, and this process skips that key until the window
ends. Tasks of a class without limits never touch the side collection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from beanie_tasks.options import RateLimit, TaskOptions

LIMITS_COLLECTION = "beanie_tasks_limits"
# A consumer reads at most this many candidates per claim attempt before it idles.
MAX_CANDIDATES = 8
# A slot holder younger than this may still be on its way to its claim: reconcile leaves it.
SLOT_CLAIM_GRACE = 30.0
# How long a consumer skips a concurrency key that was full before it asks again (a slot
# freed by this process clears the skip at once).
FULL_KEY_RECHECK = 0.5


@dataclass
class Grant:
    """What one claim took from its limits, given back if the claim does not happen after all."""

    token: str
    slots: list[str] = field(default_factory=list)  # concurrency keys joined under ``token``
    counters: list[str] = field(default_factory=list)  # rate windows a token was taken from


@dataclass(frozen=True)
class LimitPolicy:
    """A class's limits, parsed once from its settings."""

    rate: RateLimit | None = None
    key_rate: RateLimit | None = None
    key_concurrency: int | None = None

    @classmethod
    def of(cls, options: TaskOptions) -> LimitPolicy:
        return cls(
            RateLimit.parse("rate_limit", options.rate_limit),
            RateLimit.parse("key_rate_limit", options.key_rate_limit),
            options.key_concurrency,
        )

    @property
    def active(self) -> bool:
        return self.rate is not None or self.key_rate is not None or self.key_concurrency is not None


@dataclass
class KeyBlocks:
    """The keys this process found full, and until when (seconds since the epoch) it skips them."""

    class_blocked_until: float = 0.0
    rate_keys: dict[str, float] = field(default_factory=dict)
    slot_keys: dict[str, float] = field(default_factory=dict)

    def ready_in(self, now: float) -> float:
        """Seconds until the class-wide rate may allow a claim again (0 = now)."""
        return max(0.0, self.class_blocked_until - now)

    def block_class(self, until: float) -> None:
        self.class_blocked_until = until

    def block_rate_key(self, key: str, until: float) -> None:
        self.rate_keys[key] = until

    def block_slot_key(self, key: str, now: float) -> None:
        self.slot_keys[key] = now + FULL_KEY_RECHECK

    def unblock_slot_key(self, key: str) -> None:
        self.slot_keys.pop(key, None)

    def claim_filter(self, now: float) -> dict[str, Any]:
        """Conditions that keep the claim away from keys this process knows are full."""
        extra: dict[str, Any] = {}
        for name, blocked in (("rate_limit_key", self.rate_keys), ("concurrency_key", self.slot_keys)):
            for key, until in list(blocked.items()):
                if until <= now:
                    del blocked[key]
            if blocked:
                extra[name] = {"$nin": sorted(blocked)}
        return extra
