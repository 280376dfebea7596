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
A refused key's waiting tasks are parked: until its rate window ends, or (a full concurrency
key) until one of its slots frees, when the consumer giving the slot back makes them due
again. So no claim reads a blocked key's tasks, however many there are, and every consumer
sees the same state. Tasks of a class without limits never touch the side collection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from beanie_tasks.options import RateLimit, TaskOptions

LIMITS_COLLECTION = "beanie_tasks_limits"
# A limited claim reads candidates in rounds of this many. Each refused key is parked, so the
# next round reads other keys and the rounds end; the bound only guards against a bug.
CANDIDATES_PER_ROUND = 64
LIMITED_ROUNDS = 1000
# A slot holder younger than this may still be on its way to its claim: reconcile leaves it.
SLOT_CLAIM_GRACE = 30.0


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
    """Until when (seconds since the epoch) this process skips a class whose class-wide rate is spent.

    Full keys need no memory here: their waiting tasks are parked in the database, where
    every consumer sees it.
    """

    class_blocked_until: float = 0.0

    def ready_in(self, now: float) -> float:
        """Seconds until the class-wide rate may allow a claim again (0 = now)."""
        return max(0.0, self.class_blocked_until - now)

    def block_class(self, until: float) -> None:
        self.class_blocked_until = until
