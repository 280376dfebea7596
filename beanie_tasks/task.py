"""The Task document: its fields, and every state transition as one atomic MongoDB command."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Annotated, Any, ClassVar

from beanie import Document, PydanticObjectId
from beanie.odm.utils.dump import get_dict
from beanie.odm.utils.encoder import Encoder
from pydantic import AfterValidator, Field, PrivateAttr, ValidationError, field_validator
from pymongo import ASCENDING, DESCENDING, IndexModel, ReturnDocument
from pymongo.errors import DocumentTooLarge, DuplicateKeyError
from typing_extensions import Self

from beanie_tasks import driver
from beanie_tasks.errors import LeaseLost, PushError, TaskCancelled, TransitionError
from beanie_tasks.options import TaskOptions
from beanie_tasks.states import IN_FLIGHT_STATES, PRIORITY_RANGE, TERMINAL_STATES, Priority, State
from beanie_tasks.wakeup import Wakeup

log = logging.getLogger("beanie_tasks")

# A task that may not be claimed yet (it waits for dependencies) is parked here, so the
# claim filter never needs a second condition and stays served by one index.
FAR_FUTURE = datetime(9999, 12, 31, tzinfo=timezone.utc)
CLAIM_SORT = [("priority", DESCENDING), ("run_at", ASCENDING), ("_id", ASCENDING)]
MAX_QUARANTINES_PER_POP = 100


def utcnow() -> datetime:
    """Now, in UTC, truncated to the millisecond BSON stores."""
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def as_utc(value: datetime) -> datetime:
    """BSON dates are UTC; a client without ``tz_aware`` hands them back naive."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]


def require_aware(name: str, value: object) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a timezone-aware datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (for example datetime.now(timezone.utc)), got naive {value!r}")
    return as_utc(value)


def as_delay(value: object) -> timedelta:
    if isinstance(value, bool) or not isinstance(value, (int, float, timedelta)):
        raise TypeError(f"delay must be seconds or a timedelta, got {type(value).__name__}")
    delay = value if isinstance(value, timedelta) else timedelta(seconds=value)
    if delay < timedelta(0):
        raise ValueError(f"delay must not be negative, got {value!r}")
    return delay


def default_consumer_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def describe_error(error: BaseException | str | None) -> str | None:
    if error is None or isinstance(error, str):
        return error
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Task(Document):
    """Base class of every queued task; subclass it with your own typed fields.

    Per-class queue behaviour goes in a nested ``TaskSettings`` class (see
    ``TaskOptions``); Beanie's own nested ``Settings`` still names the collection.
    """

    state: State = State.CREATED
    priority: int = Field(default=Priority.MEDIUM, ge=PRIORITY_RANGE[0], le=PRIORITY_RANGE[1])
    created_at: UtcDatetime = Field(default_factory=utcnow)
    run_at: UtcDatetime | None = None
    attempts: int = Field(default=0, ge=0)
    max_attempts: int | None = Field(default=None, ge=1)
    dedupe_key: str | None = Field(default=None, min_length=1)
    result: Any = None
    error: str | None = None
    progress: float | None = None
    progress_message: str | None = None
    consumer_id: str | None = None
    lease_token: str | None = None
    lease_expires_at: UtcDatetime | None = None
    started_at: UtcDatetime | None = None
    finished_at: UtcDatetime | None = None
    expires_at: UtcDatetime | None = None

    task_options: ClassVar[TaskOptions] = TaskOptions()
    _settled: bool = PrivateAttr(default=False)

    def __init__(self, *args: Any, **data: Any) -> None:
        # Only values a caller passes are checked strictly; documents read back from a
        # client without ``tz_aware`` are normalised by ``as_utc`` instead.
        for name in ("run_at", "created_at"):
            if data.get(name) is not None:
                require_aware(name, data[name])
        super().__init__(*args, **data)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        declared = cls.__dict__.get("TaskSettings")
        cls.task_options = TaskOptions.resolve(declared, cls.task_options)

    @field_validator("priority", mode="after")
    @classmethod
    def _plain_int_priority(cls, value: int) -> int:
        return int(value)

    # ------------------------------------------------------------------ setup

    @classmethod
    async def custom_init(cls) -> None:
        """Called by ``init_beanie``: creates the indexes the queue relies on."""
        await ensure_indexes(cls)

    @classmethod
    def collection(cls) -> Any:
        return driver.collection_of(cls)

    # --------------------------------------------------------------- producing

    async def push(self, *, delay: float | timedelta | None = None, run_at: datetime | None = None) -> Self:
        """Validate and insert this task; returns it, or the in-flight task with the same ``dedupe_key``."""
        if self.id is not None:
            raise TransitionError(f"{type(self).__name__} {self.id} was already pushed")
        if delay is not None and run_at is not None:
            raise ValueError("pass either delay or run_at, not both")
        now = utcnow()
        if run_at is not None:
            due = require_aware("run_at", run_at)
        elif delay is not None:
            due = now + as_delay(delay)
        else:
            due = self.run_at or now
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        checked = type(self).model_validate(fields)
        checked.state = State.CREATED
        checked.run_at = due
        checked.max_attempts = self.max_attempts or type(self).task_options.max_attempts
        checked.id = PydanticObjectId()
        document = get_dict(checked, to_db=True, keep_nulls=True)
        if checked.dedupe_key is not None:
            document["dedupe_slot"] = checked.dedupe_key
        stored = await type(self)._insert(document)
        if stored is not None:
            return stored
        for name in ("id", "state", "run_at", "max_attempts"):
            setattr(self, name, getattr(checked, name))
        return self

    @classmethod
    async def _insert(cls, document: dict[str, Any]) -> Self | None:
        """Insert; on a dedupe clash return the in-flight twin instead (None means inserted)."""
        collection = cls.collection()
        key = document.get("dedupe_slot")
        for _ in range(5):
            try:
                await collection.insert_one(document)
                return None
            except DocumentTooLarge as exc:
                raise PushError(f"{cls.__name__} is larger than MongoDB's 16 MB document limit; store big payloads elsewhere and push a reference") from exc
            except DuplicateKeyError as exc:
                if key is None or "dedupe_slot" not in str(exc.details or exc):
                    if await collection.find_one({"_id": document["_id"]}, {"_id": 1}) is not None:
                        return None  # an ambiguous retry already stored it
                    raise
                twin = await collection.find_one({"dedupe_slot": key})
                if twin is not None:
                    return cls.model_validate(twin)
                # The twin ended between the clash and the read: the key is free again.
        raise PushError(f"could not push {cls.__name__} with dedupe_key {key!r}: the key kept changing hands")

    # --------------------------------------------------------------- claiming

    @classmethod
    def claim_filter(cls, now: datetime) -> dict[str, Any]:
        return {"state": State.CREATED.value, "run_at": {"$lte": now}}

    @classmethod
    async def pop(cls, *, consumer_id: str | None = None) -> Self | None:
        """Claim the next ready task (RUNNING, leased to this consumer), or return None."""
        collection = cls.collection()
        for _ in range(MAX_QUARANTINES_PER_POP):
            now = utcnow()
            document = await collection.find_one_and_update(
                cls.claim_filter(now),
                {
                    "$set": {
                        "state": State.RUNNING.value,
                        "consumer_id": consumer_id or default_consumer_id(),
                        "lease_token": uuid.uuid4().hex,
                        "lease_expires_at": now + cls.task_options.lease,
                        "started_at": now,
                    },
                    "$inc": {"attempts": 1},
                },
                sort=CLAIM_SORT,
                return_document=ReturnDocument.AFTER,
            )
            if document is None:
                return None
            try:
                return cls.model_validate(document)
            except ValidationError as exc:
                await cls._quarantine(document, exc)
        return None

    @classmethod
    async def _quarantine(cls, document: dict[str, Any], exc: ValidationError) -> None:
        """Set a malformed document aside as FAILED so it cannot block the queue."""
        reason = f"malformed {cls.__name__} document: {exc.error_count()} validation error(s): " + "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        log.error("%s %s set aside: %s", cls.__name__, document.get("_id"), reason)
        now = utcnow()
        await cls.collection().update_one(
            {"_id": document["_id"], "lease_token": document.get("lease_token")},
            {"$set": cls._terminal_fields(State.FAILED, now) | {"error": reason}, "$unset": {"dedupe_slot": ""}},
        )

    @classmethod
    async def queue(
        cls,
        *,
        stop: asyncio.Event | None = None,
        consumer_id: str | None = None,
        use_change_stream: bool = True,
    ) -> AsyncIterator[Self]:
        """Yield claimed tasks forever; stop with ``break`` or by setting ``stop``.

        While idle it waits on a change stream (or polls with backoff), and every
        ``recovery_interval`` it recovers tasks whose leases expired.
        """
        options = cls.task_options
        wakeup = Wakeup(
            cls.collection(),
            max_poll=options.poll_interval,
            idle_timeout=min(1.0, options.recovery_interval),
            use_change_stream=use_change_stream,
        )
        stop_waiter = asyncio.ensure_future(stop.wait()) if stop is not None else None
        if stop_waiter is not None:
            stop_waiter.add_done_callback(lambda _: wakeup.notify())
        loop = asyncio.get_running_loop()
        next_recovery = 0.0
        try:
            async with wakeup:
                while stop is None or not stop.is_set():
                    if loop.time() >= next_recovery:
                        await cls.recover_expired()
                        next_recovery = loop.time() + options.recovery_interval
                    task = await cls.pop(consumer_id=consumer_id)
                    if task is None:
                        await wakeup.wait()
                        continue
                    wakeup.claimed()
                    yield task
        finally:
            if stop_waiter is not None:
                stop_waiter.cancel()

    # ------------------------------------------------------------ transitions

    def _guard(self) -> dict[str, Any]:
        """The filter that makes a write apply only while this object's view is current."""
        if self.lease_token is not None:
            return {"_id": self.id, "state": State.RUNNING.value, "lease_token": self.lease_token}
        return {"_id": self.id, "state": State.CREATED.value, "lease_token": None}

    async def _apply(self, update: dict[str, Any], action: str) -> None:
        if self.id is None:
            raise TransitionError(f"cannot {action} a {type(self).__name__} that was never pushed")
        result = await self.collection().update_one(self._guard(), update)
        if result.matched_count == 0:
            raise await self._why_not(action)

    async def _why_not(self, action: str) -> TransitionError:
        current = await self.collection().find_one({"_id": self.id}, {"state": 1, "lease_token": 1, "consumer_id": 1})
        name = f"{type(self).__name__} {self.id}"
        if current is None:
            return TransitionError(f"cannot {action} {name}: it no longer exists")
        state = current.get("state")
        if self.lease_token is None:
            return TransitionError(f"cannot {action} {name}: it is {state}, not CREATED")
        if state == State.CANCELLED.value and current.get("lease_token") == self.lease_token:
            return TaskCancelled(f"cannot {action} {name}: it was cancelled while this consumer held it")
        return LeaseLost(
            f"cannot {action} {name}: this consumer's lease was lost "
            f"(the task is now {state}, held by {current.get('consumer_id') or 'nobody'})"
        )

    @classmethod
    def _terminal_fields(cls, state: State, now: datetime) -> dict[str, Any]:
        ttl = cls.task_options.ttl
        return {
            "state": state.value,
            "finished_at": now,
            "expires_at": now + timedelta(seconds=ttl) if ttl is not None else None,
            "lease_expires_at": None,
        }

    def _adopt(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if name in type(self).model_fields:
                setattr(self, name, State(value) if name == "state" else value)

    async def finish(self, result: Any = None) -> None:
        """Mark the task FINISHED and store ``result``; raises LeaseLost if the lease was lost."""
        now = utcnow()
        fields = self._terminal_fields(State.FINISHED, now) | {"result": Encoder(to_db=True).encode(result)}
        await self._apply({"$set": fields, "$unset": {"dedupe_slot": ""}}, "finish")
        self._adopt(fields | {"result": result})
        self._settled = True

    async def fail(
        self,
        error: BaseException | str | None = None,
        *,
        retry: bool = True,
        retry_in: float | timedelta | None = None,
    ) -> None:
        """Record a failed attempt: back to CREATED for a later retry while attempts remain, else FAILED.

        ``retry=False`` dead-letters the task at once; ``retry_in`` overrides the backoff delay.
        """
        now = utcnow()
        claimed = self.lease_token is not None
        failures = self.attempts if claimed else self.attempts + 1
        limit = self.max_attempts or type(self).task_options.max_attempts
        message = describe_error(error)
        update: dict[str, Any]
        if retry and failures < limit:
            wait = as_delay(retry_in) if retry_in is not None else type(self).task_options.backoff.delay(failures)
            fields = {"state": State.CREATED.value, "run_at": now + wait, "error": message, "lease_token": None, "lease_expires_at": None}
            update = {"$set": fields}
        else:
            fields = self._terminal_fields(State.FAILED, now) | {"error": message}
            update = {"$set": fields, "$unset": {"dedupe_slot": ""}}
        if not claimed:
            update["$inc"] = {"attempts": 1}
        await self._apply(update, "fail")
        self._adopt(fields | {"attempts": failures})
        self._settled = True

    async def cancel(self) -> bool:
        """Cancel a CREATED or RUNNING task; a running worker sees it at its next heartbeat.

        Returns False when the task had already ended.
        """
        now = utcnow()
        fields = self._terminal_fields(State.CANCELLED, now)
        result = await self.collection().update_one(
            {"_id": self.id, "state": {"$in": [s.value for s in IN_FLIGHT_STATES]}},
            {"$set": fields, "$unset": {"dedupe_slot": ""}},
        )
        if result.matched_count:
            self._adopt(fields)
        return bool(result.matched_count)

    async def heartbeat(self) -> None:
        """Extend this consumer's lease by the class's visibility timeout."""
        await self._extend({})

    async def set_progress(self, value: float, message: str | None = None) -> None:
        """Record progress (any number; a fraction 0..1 reads best) and extend the lease."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"progress must be a number, got {type(value).__name__}")
        await self._extend({"progress": float(value), "progress_message": message})

    async def _extend(self, extra: dict[str, Any]) -> None:
        if self.lease_token is None:
            raise TransitionError(f"{type(self).__name__} {self.id} is not leased by this consumer")
        fields = {"lease_expires_at": utcnow() + type(self).task_options.lease} | extra
        await self._apply({"$set": fields}, "extend the lease of")
        self._adopt(fields)

    async def release(self, *, delay: float | timedelta | None = None) -> None:
        """Give the task back unrun (for example at shutdown) without spending an attempt."""
        if self.lease_token is None:
            raise TransitionError(f"{type(self).__name__} {self.id} is not leased by this consumer")
        fields = {
            "state": State.CREATED.value,
            "run_at": utcnow() + (as_delay(delay) if delay is not None else timedelta(0)),
            "lease_token": None,
            "lease_expires_at": None,
        }
        await self._apply({"$set": fields, "$inc": {"attempts": -1}}, "release")
        self._adopt(fields | {"attempts": self.attempts - 1})
        self._settled = True

    # ------------------------------------------------------- context manager

    async def __aenter__(self) -> Self:
        self._settled = False
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._settled or self.state in TERMINAL_STATES:
            return
        if exc is None:
            await self.finish()
        else:
            await self.fail(exc)

    # ------------------------------------------------------------- recovery

    @classmethod
    async def recover_expired(cls) -> int:
        """Return tasks whose lease expired to CREATED, or to FAILED when no attempts remain.

        One ``update_many``; returns how many tasks were recovered.
        """
        now = utcnow()
        exhausted = {"$gte": ["$attempts", {"$ifNull": ["$max_attempts", cls.task_options.max_attempts]}]}
        ttl = cls.task_options.ttl
        expires = now + timedelta(seconds=ttl) if ttl is not None else None
        reason = "lease expired while running (worker died or stalled); no attempts left"
        result = await cls.collection().update_many(
            {"state": State.RUNNING.value, "lease_expires_at": {"$lt": now}},
            [
                {
                    "$set": {
                        "state": {"$cond": [exhausted, State.FAILED.value, State.CREATED.value]},
                        "error": {"$cond": [exhausted, reason, "lease expired while running; retrying"]},
                        "finished_at": {"$cond": [exhausted, now, None]},
                        "expires_at": {"$cond": [exhausted, expires, None]},
                        "dedupe_slot": {"$cond": [exhausted, "$$REMOVE", "$dedupe_slot"]},
                        "run_at": now,
                        "lease_token": None,
                        "lease_expires_at": None,
                    }
                }
            ],
        )
        if result.modified_count:
            log.warning("%s: recovered %d task(s) with expired leases", cls.__name__, result.modified_count)
        return int(result.modified_count)

    # --------------------------------------------------------------- admin

    @classmethod
    async def counts(cls) -> dict[State, int]:
        """How many tasks are in each state (every state present, zero included)."""
        rows = await driver.aggregate(cls.collection(), [{"$group": {"_id": "$state", "n": {"$sum": 1}}}])
        counts = dict.fromkeys(State, 0)
        for row in rows:
            if row["_id"] in State._value2member_map_:
                counts[State(row["_id"])] = int(row["n"])
        return counts

    @classmethod
    async def requeue_failed(cls) -> int:
        """Give FAILED tasks a fresh set of attempts; returns how many were requeued.

        A task whose ``dedupe_key`` is already taken by a newer in-flight task stays FAILED.
        """
        collection = cls.collection()
        fields = {"state": State.CREATED.value, "attempts": 0, "run_at": utcnow(), "finished_at": None, "expires_at": None}
        result = await collection.update_many({"state": State.FAILED.value, "dedupe_key": None}, {"$set": fields})
        requeued = int(result.modified_count)
        async for row in collection.find({"state": State.FAILED.value, "dedupe_key": {"$ne": None}}, {"dedupe_key": 1}):
            try:
                outcome = await collection.update_one(
                    {"_id": row["_id"], "state": State.FAILED.value},
                    {"$set": fields | {"dedupe_slot": row["dedupe_key"]}},
                )
                requeued += outcome.modified_count
            except DuplicateKeyError:
                log.info("%s %s stays FAILED: dedupe_key %r is in flight again", cls.__name__, row["_id"], row["dedupe_key"])
        return requeued

    @classmethod
    async def purge(cls, states: Iterable[State | str], *, force: bool = False) -> int:
        """Delete tasks in the given states; in-flight states need ``force=True``."""
        wanted = {State(s) for s in states}
        if not wanted:
            raise ValueError("purge needs at least one state")
        live = wanted & IN_FLIGHT_STATES
        if live and not force:
            raise ValueError(f"refusing to purge in-flight states {sorted(s.value for s in live)} without force=True")
        result = await cls.collection().delete_many({"state": {"$in": sorted(s.value for s in wanted)}})
        return int(result.deleted_count)


async def ensure_indexes(task_class: type[Task]) -> None:
    """Create the queue's indexes (idempotent); ``init_beanie`` calls this through ``custom_init``."""
    collection = task_class.collection()
    await collection.create_indexes(
        [
            # Equality (state), then sort (priority, run_at, _id), then range (run_at).
            IndexModel([("state", ASCENDING), ("priority", DESCENDING), ("run_at", ASCENDING), ("_id", ASCENDING)], name="bt_claim"),
            IndexModel([("state", ASCENDING), ("lease_expires_at", ASCENDING)], name="bt_lease"),
            IndexModel([("dedupe_slot", ASCENDING)], name="bt_dedupe", unique=True, **driver.only_present("dedupe_slot", collection)),
            IndexModel([("expires_at", ASCENDING)], name="bt_expiry", expireAfterSeconds=0),
        ]
    )
