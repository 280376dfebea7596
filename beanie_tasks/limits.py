"""Rate and concurrency limits, enforced atomically in a small side collection every worker shares.

A worker claims a task as usual, then asks the limits collection for permission to run it:

* a **rate** is a fixed-window counter document per (class, key, window); one conditional
  ``$inc`` either takes a token or matches nothing (the window is full);
* a **concurrency cap** is a slot document per (class, ``concurrency_key``) holding the lease
  tokens of the tasks running under it; one conditional ``$addToSet`` joins only while the
  array is shorter than the cap.

Both are single atomic updates, so no two processes can both take the last token or slot.
A task that is refused is given back exactly as it was (CREATED, same priority, same
``run_at``, attempt refunded) and the worker skips that key until the window ends. Tasks of
a class without limits never touch this collection.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.errors import DuplicateKeyError

from beanie_tasks.options import RateLimit
from beanie_tasks.task import CLAIM_SORT, Task, as_utc, utcnow

log = logging.getLogger("beanie_tasks.limits")

LIMITS_COLLECTION = "beanie_tasks_limits"
# A worker reads at most this many candidates per claim attempt before it idles.
MAX_CANDIDATES = 8
# A slot holder younger than this may still be on its way to its claim: reconcile leaves it.
SLOT_CLAIM_GRACE = 30.0
# How long a worker skips a concurrency key that was full before it asks again (a slot
# freed by this worker clears the skip at once).
FULL_KEY_RECHECK = 0.5


@dataclass
class Grant:
    """What a claimed task took from its limits: slots are given back when it leaves RUNNING."""

    token: str
    slots: list[tuple[str, str]] = field(default_factory=list)  # (slot document id, concurrency key)
    counters: list[str] = field(default_factory=list)  # rate windows a token was taken from


def limits_collection(task_class: type[Task]) -> Any:
    """The limits collection in the task class's own database."""
    return task_class.collection().database[LIMITS_COLLECTION]


async def ensure_limit_indexes(collection: Any) -> None:
    """Expired rate windows remove themselves; slot documents are looked up by scope."""
    await collection.create_indexes(
        [
            IndexModel([("expires_at", ASCENDING)], name="bt_limit_expiry", expireAfterSeconds=0),
            IndexModel([("scope", ASCENDING)], name="bt_limit_scope"),
        ]
    )


async def _conditional_upsert(collection: Any, selector: dict[str, Any], update: dict[str, Any]) -> bool:
    """Apply ``update`` if ``selector`` matches, creating the document when it does not exist.

    When the document exists but the condition fails, the upsert collides on ``_id``:
    that is a refusal. Two first-comers racing to create it also collide, so the loser
    retries as a plain conditional update before it takes no for an answer.
    """
    try:
        await collection.update_one(selector, update, upsert=True)
        return True
    except DuplicateKeyError:
        update = {k: v for k, v in update.items() if k != "$setOnInsert"}
        result = await collection.update_one(selector, update)
        return bool(result.matched_count)


class Limiter:
    """The limits of one task class, as seen by one worker process."""

    def __init__(self, task_class: type[Task]) -> None:
        options = task_class.task_options
        self.task_class = task_class
        self.rate = RateLimit.parse("rate_limit", options.rate_limit)
        self.key_rate = RateLimit.parse("key_rate_limit", options.key_rate_limit)
        self.key_concurrency = options.key_concurrency
        self.scope = f"{task_class.collection().name}:{task_class.__name__}"
        self._collection: Any = None
        self._class_blocked_until = 0.0
        self._rate_keys_blocked: dict[str, float] = {}
        self._slot_keys_blocked: dict[str, float] = {}

    @property
    def active(self) -> bool:
        return self.rate is not None or self.key_rate is not None or self.key_concurrency is not None

    async def setup(self) -> None:
        if self.active:
            self._collection = limits_collection(self.task_class)
            await ensure_limit_indexes(self._collection)

    # ------------------------------------------------------------ local view

    def ready_in(self, now: float | None = None) -> float:
        """Seconds until the class-wide rate may allow a claim again (0 = now)."""
        return max(0.0, self._class_blocked_until - (now if now is not None else time.time()))

    def claim_filter(self) -> dict[str, Any] | None:
        """Conditions that keep the claim away from keys this worker knows are full."""
        now = time.time()
        extra: dict[str, Any] = {}
        for name, blocked in (
            ("rate_limit_key", self._rate_keys_blocked),
            ("concurrency_key", self._slot_keys_blocked),
        ):
            for key, until in list(blocked.items()):
                if until <= now:
                    del blocked[key]
            if blocked:
                extra[name] = {"$nin": sorted(blocked)}
        return extra or None

    # ---------------------------------------------------------------- claim

    async def claim(self, consumer_id: str) -> tuple[Task, Grant] | None:
        """Claim the next ready task whose limits allow it to start now, or return None.

        It reads the next candidate, takes what the candidate's limits require (each one
        conditional update), and only then claims exactly that task under the lease token
        the slots were taken for. A refused task is never touched: it stays CREATED with
        its priority, ``run_at`` and attempts. If another worker claims the candidate
        first, everything taken is given back.
        """
        task_class = self.task_class
        for _ in range(MAX_CANDIDATES):
            if self.ready_in() > 0:
                return None
            selector = task_class.claim_filter(utcnow()) | (self.claim_filter() or {})
            candidate = await task_class.collection().find_one(
                selector, {"rate_limit_key": 1, "concurrency_key": 1}, sort=CLAIM_SORT
            )
            if candidate is None:
                return None
            token = uuid.uuid4().hex
            grant = await self.acquire(candidate.get("rate_limit_key"), candidate.get("concurrency_key"), token)
            if grant is None:
                continue  # that key is now skipped: look at the next candidate
            task = await task_class.pop(consumer_id=consumer_id, exclude={"_id": candidate["_id"]}, lease_token=token)
            if task is not None:
                return task, grant
            await self.undo(grant)  # another worker was faster
        return None

    async def acquire(self, rate_key: str | None, slot_key: str | None, token: str) -> Grant | None:
        """Take every token and slot a task with these keys needs, all or nothing; None means wait."""
        now = time.time()
        grant = Grant(token=token)
        if self.rate is not None and not await self._take_rate("*", self.rate, now, grant):
            self._class_blocked_until = self.rate.window(now)[1]
            return None
        key_rate = self.key_rate
        if key_rate is not None and rate_key is not None and not await self._take_rate(rate_key, key_rate, now, grant):
            self._rate_keys_blocked[rate_key] = key_rate.window(now)[1]
            await self.undo(grant)
            return None
        if self.key_concurrency is not None and slot_key is not None:
            slot = f"slots:{self.scope}:{slot_key}"
            joined = await _conditional_upsert(
                self._collection,
                {"_id": slot, f"holders.{self.key_concurrency - 1}": {"$exists": False}},
                {"$push": {"holders": {"t": token, "at": utcnow()}}, "$setOnInsert": {"scope": self.scope}},
            )
            if not joined:
                self._slot_keys_blocked[slot_key] = now + FULL_KEY_RECHECK
                await self.undo(grant)
                return None
            grant.slots.append((slot, slot_key))
        return grant

    async def _take_rate(self, key: str, rate: RateLimit, now: float, grant: Grant) -> bool:
        index, ends = rate.window(now)
        counter = f"rate:{self.scope}:{key}:{index}"
        expires = datetime.fromtimestamp(ends, timezone.utc) + timedelta(seconds=max(rate.per, 60.0))
        ok = await _conditional_upsert(
            self._collection,
            {"_id": counter, "n": {"$lt": rate.count}},
            {"$inc": {"n": 1}, "$setOnInsert": {"scope": self.scope, "expires_at": expires}},
        )
        if ok:
            grant.counters.append(counter)
        return ok

    async def undo(self, grant: Grant) -> None:
        """Give back everything a grant took, for a task that did not start after all."""
        for counter in grant.counters:
            await self._collection.update_one({"_id": counter, "n": {"$gt": 0}}, {"$inc": {"n": -1}})
        grant.counters.clear()
        await self.release(grant)

    async def release(self, grant: Grant) -> None:
        """Give back the concurrency slots of a task that has left RUNNING (rate tokens stay spent)."""
        for slot, key in grant.slots:
            await self._collection.update_one({"_id": slot}, {"$pull": {"holders": {"t": grant.token}}})
            self._slot_keys_blocked.pop(key, None)
        grant.slots.clear()

    async def reconcile(self) -> int:
        """Free slots held by tasks that are no longer RUNNING under that lease (their worker died).

        A holder is a lease token, unique to one claim. Once the task is no longer RUNNING
        under it, the token can never become valid again; the age check leaves alone a
        holder whose claim is still a few milliseconds away.
        """
        if self.key_concurrency is None or self._collection is None:
            return 0
        settled_before = utcnow() - timedelta(seconds=SLOT_CLAIM_GRACE)
        holders: set[str] = set()
        async for row in self._collection.find({"scope": self.scope, "holders.0": {"$exists": True}}, {"holders": 1}):
            holders.update(h["t"] for h in row.get("holders") or [] if as_utc(h["at"]) < settled_before)
        if not holders:
            return 0
        alive = {
            row["lease_token"]
            async for row in self.task_class.collection().find(
                {"state": "RUNNING", "lease_token": {"$in": sorted(holders)}}, {"lease_token": 1}
            )
        }
        stale = sorted(holders - alive)
        if stale:
            await self._collection.update_many({"scope": self.scope}, {"$pull": {"holders": {"t": {"$in": stale}}}})
            name = self.task_class.__name__
            log.warning("%s: freed %d concurrency slot(s) of tasks that stopped running", name, len(stale))
        return len(stale)
