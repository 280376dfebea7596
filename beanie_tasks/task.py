"""The Task document: its fields, and every state transition as one atomic MongoDB command."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterable
from contextvars import ContextVar
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Annotated, Any, ClassVar

from beanie import Document, PydanticObjectId
from beanie.odm.fields import ExpressionField
from beanie.odm.utils.dump import get_dict
from beanie.odm.utils.encoder import Encoder
from pydantic import AfterValidator, BaseModel, Field, PrivateAttr, ValidationError, field_validator
from pymongo import ASCENDING, DESCENDING, IndexModel, ReturnDocument
from pymongo.errors import ConnectionFailure, DocumentTooLarge, DuplicateKeyError, PyMongoError, WriteError
from typing_extensions import Self

from beanie_tasks import dependencies, driver
from beanie_tasks.errors import LeaseLost, PushError, TaskCancelled, TaskFailed, TransitionError, WaitTimeout
from beanie_tasks.options import TaskOptions
from beanie_tasks.redact import redact_text
from beanie_tasks.states import IN_FLIGHT_STATES, PRIORITY_RANGE, TERMINAL_STATES, Priority, State
from beanie_tasks.wakeup import Wakeup

log = logging.getLogger("beanie_tasks")

# A task that may not be claimed yet (it waits for dependencies) is parked here, so the
# claim filter never needs a second condition and stays served by one index.
FAR_FUTURE = datetime(9999, 12, 31, tzinfo=timezone.utc)
CLAIM_INDEX = "bt_claim"
CLAIM_SORT = [("priority", DESCENDING), ("run_at", ASCENDING), ("_id", ASCENDING)]
MAX_QUARANTINES_PER_POP = 100
# The server's code for a document over the 16 MB limit that the driver let through.
BSON_OBJECT_TOO_LARGE = 10334
# queue() looks for documents no claim can match once every this many recovery rounds.
SWEEP_EVERY_RECOVERIES = 10


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

# Set while stored data is validated (``model_validate``, which Beanie's reads use too):
# pydantic runs a custom ``__init__`` then as well, and a naive date there is a BSON date
# from a client without ``tz_aware``, not a caller's mistake.
_reading_stored: ContextVar[bool] = ContextVar("beanie_tasks_reading_stored", default=False)


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


class Outage:
    """Backoff and one clear log line per outage while a consumer cannot reach the server."""

    def __init__(self, name: str, *, first: float = 0.1, longest: float = 2.0) -> None:
        self._name = name
        self._first = first
        self._longest = longest
        self._delay = 0.0

    async def wait(self, error: BaseException, stop: asyncio.Event | None) -> None:
        if self._delay == 0.0:
            reason = redact_text(str(describe_error(error)))
            log.warning("%s: lost the server (%s); retrying until it is back", self._name, reason)
        self._delay = min(max(self._delay * 2, self._first), self._longest)
        if stop is None:
            await asyncio.sleep(self._delay)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), self._delay)

    def over(self) -> None:
        if self._delay:
            log.warning("%s: the server is reachable again", self._name)
            self._delay = 0.0


def restore_field_defaults(cls: type[BaseModel]) -> None:
    """Undo defaults that pydantic took from Beanie's query expressions.

    ``init_beanie`` sets an ``ExpressionField`` class attribute for every field of each
    class it initialises, the parent ``Task`` included; a subclass defined afterwards
    would take those as its field defaults (``id == "_id"``, ``state == "state"``).
    """
    spoiled = [name for name, info in cls.model_fields.items() if isinstance(info.default, ExpressionField)]
    for name in spoiled:
        for base in cls.__mro__[1:]:
            fields = getattr(base, "__pydantic_fields__", {})
            if name in fields and not isinstance(fields[name].default, ExpressionField):
                cls.__pydantic_fields__[name] = copy.copy(fields[name])
                break
    if spoiled:
        cls.model_rebuild(force=True)


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
    # Limits (limits.py): the key a class's key_rate_limit / key_concurrency counts this task under.
    rate_limit_key: str | None = Field(default=None, min_length=1)
    concurrency_key: str | None = Field(default=None, min_length=1)

    task_options: ClassVar[TaskOptions] = TaskOptions()
    _settled: bool = PrivateAttr(default=False)
    # The id a failed push chose: pushing the same object again reuses it, so a retry
    # after an error whose write did land cannot store the task twice.
    _push_id: PydanticObjectId | None = PrivateAttr(default=None)

    def __init__(self, *args: Any, **data: Any) -> None:
        # Only values a caller passes are checked strictly; documents read back from a
        # client without ``tz_aware`` are normalised by ``as_utc`` instead.
        if not _reading_stored.get():
            for name in ("run_at", "created_at"):
                if data.get(name) is not None:
                    require_aware(name, data[name])
        super().__init__(*args, **data)

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:
        """Validate stored data, where naive dates are UTC (see ``as_utc``)."""
        token = _reading_stored.set(True)
        try:
            return super().model_validate(obj, *args, **kwargs)  # type: ignore[no-any-return,unused-ignore]
        finally:
            _reading_stored.reset(token)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        restore_field_defaults(cls)
        declared = cls.__dict__.get("TaskSettings")
        cls.task_options = TaskOptions.resolve(declared, cls.task_options)
        dependencies.declared_links(cls)  # checks the link declarations at import

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
        checked.id = self._push_id = self._push_id or PydanticObjectId()
        dependencies.require_pushed_links(checked)
        document = get_dict(checked, to_db=True, keep_nulls=True)
        if checked.dedupe_key is not None:
            document["dedupe_slot"] = checked.dedupe_key
        links = await dependencies.prepare_push(checked, document)
        stored = await type(self)._insert(document)
        if stored is not None:
            return stored
        if links is not None:
            await links.register(checked)
        for name in ("id", "state", "run_at", "max_attempts", "error"):
            setattr(self, name, getattr(checked, name))
        return self

    @classmethod
    async def _insert(cls, document: dict[str, Any]) -> Self | None:
        """Insert; on a dedupe clash return the in-flight twin instead (None means inserted)."""
        collection = cls.collection()
        key = document.get("dedupe_slot")
        for _ in range(5):
            try:
                driver.check_document_size(collection, document)
                await collection.insert_one(document)
                return None
            except DuplicateKeyError as exc:
                if key is None or "dedupe_slot" not in str(exc.details or exc):
                    if await collection.find_one({"_id": document["_id"]}, {"_id": 1}) is not None:
                        return None  # an ambiguous retry already stored it
                    raise
                twin = await collection.find_one({"dedupe_slot": key})
                if twin is not None:
                    return cls.model_validate(twin)  # type: ignore[no-any-return,unused-ignore]
                # The twin ended between the clash and the read: the key is free again.
            except (DocumentTooLarge, WriteError) as exc:
                if isinstance(exc, WriteError) and exc.code != BSON_OBJECT_TOO_LARGE:
                    raise PushError(f"could not push {cls.__name__}: {redact_text(str(exc))}") from exc
                raise PushError(
                    f"{cls.__name__} is larger than MongoDB's 16 MB document limit; "
                    "store big payloads elsewhere and push a reference"
                ) from exc
            except PyMongoError as exc:
                raise PushError(
                    f"could not push {cls.__name__} {document['_id']}: {redact_text(describe_error(exc) or '')}. "
                    "It may or may not be stored; calling push() again on the same object is safe (it reuses this id)"
                ) from exc
        raise PushError(f"could not push {cls.__name__} with dedupe_key {key!r}: the key kept changing hands")

    # --------------------------------------------------------------- claiming

    @classmethod
    def claim_filter(cls, now: datetime) -> dict[str, Any]:
        return {"state": State.CREATED.value, "run_at": {"$lte": now}}

    @classmethod
    async def pop(
        cls,
        *,
        consumer_id: str | None = None,
        exclude: dict[str, Any] | None = None,
        lease_token: str | None = None,
    ) -> Self | None:
        """Claim the next ready task (RUNNING, leased to this consumer), or return None.

        ``exclude`` adds conditions to the claim, narrowing it (the worker's limiter pins
        the claim to the task it reserved limits for); ``lease_token`` chooses the new
        lease's token (the limiter reserves slots under it before claiming).
        """
        collection = cls.collection()
        for _ in range(MAX_QUARANTINES_PER_POP):
            now = utcnow()
            document = await collection.find_one_and_update(
                cls.claim_filter(now) | (exclude or {}),
                {
                    "$set": {
                        "state": State.RUNNING.value,
                        "consumer_id": consumer_id or default_consumer_id(),
                        "lease_token": lease_token or uuid.uuid4().hex,
                        "lease_expires_at": now + cls.task_options.lease,
                        "started_at": now,
                    },
                    "$inc": {"attempts": 1},
                },
                sort=CLAIM_SORT,
                return_document=ReturnDocument.AFTER,
                # Pin the plan to the claim index; a claim pinned to one _id is better served by _id.
                **(driver.index_hint(collection, CLAIM_INDEX) if not exclude else {}),
            )
            if document is None:
                return None
            foreign = cls._foreign_class(document)
            if foreign is not None:
                await cls._set_aside(document, foreign)
                continue
            try:
                return cls.model_validate(document)  # type: ignore[no-any-return,unused-ignore]
            except ValidationError as exc:
                await cls._quarantine(document, exc)
        return None

    @classmethod
    def _foreign_class(cls, document: dict[str, Any]) -> str | None:
        """Why ``document`` names a class other than this one (None when it does not).

        Only classes registered in this process run; a class named by the database is
        never looked up or imported.
        """
        field = cls.get_settings().class_id
        named = document.get(field)
        if named is None:
            return None
        own = getattr(cls, "_class_id", None)
        if own is not None and (named == own or (isinstance(named, str) and named.startswith(f"{own}."))):
            return None
        return f"document names class {str(named)[:100]!r} in {field}, not {cls.__name__}; it was not run"

    @classmethod
    async def _quarantine(cls, document: dict[str, Any], exc: ValidationError) -> None:
        """Set a malformed document aside as FAILED so it cannot block the queue."""
        reason = f"malformed {cls.__name__} document: {exc.error_count()} validation error(s): " + "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        await cls._set_aside(document, reason)

    @classmethod
    async def _set_aside(cls, document: dict[str, Any], reason: str, guard: dict[str, Any] | None = None) -> bool:
        """Mark one document FAILED with ``reason`` (guarded so a concurrent change wins)."""
        log.error("%s %s set aside: %s", cls.__name__, document.get("_id"), reason)
        now = utcnow()
        result = await cls.collection().update_one(
            guard or {"_id": document["_id"], "lease_token": document.get("lease_token")},
            {"$set": cls._terminal_fields(State.FAILED, now) | {"error": reason}, "$unset": {"dedupe_slot": ""}},
        )
        if result.modified_count:
            await dependencies.after_terminal_by_id(cls, document["_id"])
        return bool(result.modified_count)

    @classmethod
    async def set_aside_unclaimable(cls, *, limit: int = MAX_QUARANTINES_PER_POP) -> int:
        """Mark FAILED, with the reason, documents that no claim or recovery would ever pick up.

        An unknown or missing state, a CREATED task whose ``run_at`` is missing or not a
        date, a RUNNING task without a ``lease_expires_at`` date: left alone, each would
        sit in the collection forever. ``queue()`` runs this every few recovery rounds;
        returns how many documents were set aside.
        """
        checks: list[tuple[dict[str, Any], str, str]] = [
            ({"state": {"$nin": [s.value for s in State]}}, "state", "is not a known state"),
            (
                {"state": State.CREATED.value, "run_at": {"$not": {"$type": "date"}}},
                "run_at",
                "is missing or not a date",
            ),
            (
                {"state": State.RUNNING.value, "lease_expires_at": {"$not": {"$type": "date"}}},
                "lease_expires_at",
                "is missing or not a date on a RUNNING task",
            ),
        ]
        collection = cls.collection()
        count = 0
        for condition, field, problem in checks:
            rows = [row async for row in collection.find(condition, {field: 1}).limit(limit)]
            for row in rows:
                value = repr(row.get(field, "<missing>"))[:100]
                reason = f"malformed {cls.__name__} document: {field} {value} {problem}; it can never be claimed"
                count += await cls._set_aside(row, reason, guard={"_id": row["_id"], **condition})
        return count

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
        next_recovery = next_sweep = 0.0
        outage = Outage(cls.__name__)
        try:
            async with wakeup:
                while stop is None or not stop.is_set():
                    try:
                        if loop.time() >= next_sweep:
                            await cls.set_aside_unclaimable()
                            next_sweep = loop.time() + SWEEP_EVERY_RECOVERIES * options.recovery_interval
                        if loop.time() >= next_recovery:
                            await cls.recover_expired()
                            next_recovery = loop.time() + options.recovery_interval
                        task = await cls.pop(consumer_id=consumer_id)
                    except ConnectionFailure as exc:
                        # The server is down or unreachable: keep trying, never give up the loop.
                        await outage.wait(exc, stop)
                        continue
                    outage.over()
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

    async def _apply(self, update: dict[str, Any], action: str, *, done: dict[str, Any] | None = None) -> None:
        """Write ``update`` under the lease guard.

        ``done`` fingerprints the document this very transition leaves behind: when the
        guard matches nothing because an earlier attempt of the same call was applied
        (a write whose reply was lost, then retried), that is success, not a lost lease.
        """
        if self.id is None:
            raise TransitionError(f"cannot {action} a {type(self).__name__} that was never pushed")
        # A transition that ends a task other tasks may depend on returns its dependents (same one command).
        ended = dependencies.ends_a_link_target(type(self), update)
        if ended:
            document = await self.collection().find_one_and_update(
                self._guard(), update, projection=dependencies.ENDED_PROJECTION, return_document=ReturnDocument.AFTER
            )
            matched = document is not None
        else:
            result = await self.collection().update_one(self._guard(), update)
            matched, document = result.matched_count > 0, None
        if not matched:
            error = await self._why_not(action, done)
            if error is None:
                log.info("%s %s: %s had already been applied (retried write)", type(self).__name__, self.id, action)
                if ended:
                    await dependencies.after_terminal_by_id(type(self), self.id)
                return
            if isinstance(error, LeaseLost) and not isinstance(error, TaskCancelled):
                log.warning("%s", error)
            raise error
        if document is not None:
            await dependencies.after_terminal(type(self), document, update["$set"])

    async def _why_not(self, action: str, done: dict[str, Any] | None = None) -> TransitionError | None:
        wanted = {"state": 1, "lease_token": 1, "consumer_id": 1} | dict.fromkeys(done or {}, 1)
        current = await self.collection().find_one({"_id": self.id}, wanted)
        name = f"{type(self).__name__} {self.id}"
        if current is None:
            return TransitionError(f"cannot {action} {name}: it no longer exists")
        if self.lease_token is not None and done and all(current.get(k) == v for k, v in done.items()):
            return None
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
        mine = {"state": State.FINISHED.value, "lease_token": self.lease_token}
        await self._apply({"$set": fields, "$unset": {"dedupe_slot": ""}}, "finish", done=mine)
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
            fields = {
                "state": State.CREATED.value,
                "run_at": now + wait,
                "error": message,
                "lease_token": None,
                "lease_expires_at": None,
            }
            update = {"$set": fields}
            # Recovery would leave a different error, a new claim a different state or attempts.
            mine = {"state": State.CREATED.value, "lease_token": None, "attempts": self.attempts, "error": message}
        else:
            fields = self._terminal_fields(State.FAILED, now) | {"error": message}
            update = {"$set": fields, "$unset": {"dedupe_slot": ""}}
            mine = {"state": State.FAILED.value, "lease_token": self.lease_token, "error": message}
        if not claimed:
            update["$inc"] = {"attempts": 1}
        await self._apply(update, "fail", done=mine)
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
            await dependencies.after_terminal_by_id(type(self), self.id)
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
        mine = {"state": State.CREATED.value, "lease_token": None, "attempts": self.attempts - 1}
        await self._apply({"$set": fields, "$inc": {"attempts": -1}}, "release", done=mine)
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

    # --------------------------------------------------------------- running

    def run(self) -> Any:
        """The handler a worker calls; override it with ``async def run(self)`` or a plain ``def run(self)``.

        What it returns is stored as ``result``; an exception fails the attempt. (Declared
        plain here so that both kinds of override type-check.)
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no run() method: define `async def run(self)` (or `def run(self)`) "
            "on the class so a worker can execute it"
        )

    async def wait(self, timeout: float | timedelta | None = None, *, poll_interval: float = 0.5) -> Self:
        """Wait until this task ends and return it (FINISHED, with ``result``) freshly read.

        Raises TaskFailed (the task is on ``.task``) when it ends FAILED or CANCELLED, and
        WaitTimeout when ``timeout`` passes first. A change stream wakes it where the
        server has one; otherwise it polls, backing off up to ``poll_interval``.
        """
        if self.id is None:
            raise TransitionError(f"cannot wait for a {type(self).__name__} that was never pushed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + as_delay(timeout).total_seconds() if timeout is not None else None
        collection = self.collection()
        name = f"{type(self).__name__} {self.id}"
        wakeup = Wakeup(collection, pipeline=[{"$match": {"documentKey._id": self.id}}], max_poll=poll_interval)
        async with wakeup:
            while True:
                document = await collection.find_one({"_id": self.id})
                if document is None:
                    raise TransitionError(f"cannot wait for {name}: it no longer exists")
                if document.get("state") in {s.value for s in TERMINAL_STATES}:
                    ended = type(self).model_validate(document)
                    if ended.state is State.FINISHED:
                        return ended  # type: ignore[no-any-return,unused-ignore]
                    raise TaskFailed(f"{name} ended {ended.state.value}: {ended.error or 'no error recorded'}", ended)
                remaining = deadline - loop.time() if deadline is not None else None
                if remaining is not None and remaining <= 0:
                    state = document.get("state")
                    waited = as_delay(timeout).total_seconds()
                    raise WaitTimeout(f"{name} is still {getattr(state, 'value', state)} after {waited:g} s")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), remaining)

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
        collection = cls.collection()
        result = await collection.update_many(
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
            if driver.is_mock(collection):
                # mongomock treats "$$REMOVE" as a no-op on an existing field: free the slots here.
                await collection.update_many(
                    {"state": State.FAILED.value, "dedupe_slot": {"$exists": True}}, {"$unset": {"dedupe_slot": ""}}
                )
        # Tell dependents of tasks that ended above or whose finisher died; no command for classes outside the graph.
        await dependencies.sweep(cls)
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
        fields = {
            "state": State.CREATED.value,
            "attempts": 0,
            "run_at": utcnow(),
            "finished_at": None,
            "expires_at": None,
            "lease_token": None,  # a fresh, unclaimed task: the last holder's token no longer applies
        }
        # A task failed because a dependency failed stays FAILED: requeued, it would run without its links.
        failed = {"state": State.FAILED.value, "dep_failed": None}
        result = await collection.update_many(failed | {"dedupe_key": None}, {"$set": fields})
        requeued = int(result.modified_count)
        async for row in collection.find(failed | {"dedupe_key": {"$ne": None}}, {"dedupe_key": 1}):
            try:
                outcome = await collection.update_one(
                    {"_id": row["_id"], "state": State.FAILED.value},
                    {"$set": fields | {"dedupe_slot": row["dedupe_key"]}},
                )
                requeued += outcome.modified_count
            except DuplicateKeyError:
                log.info(
                    "%s %s stays FAILED: dedupe_key %r is in flight again", cls.__name__, row["_id"], row["dedupe_key"]
                )
        return requeued

    @classmethod
    async def check_dependencies(cls) -> int:
        """Repair dependency bookkeeping now (deleted links, lost notifications); see ``dependencies.sweep``."""
        return await dependencies.check_dependencies(cls)

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
            IndexModel(
                [("state", ASCENDING), ("priority", DESCENDING), ("run_at", ASCENDING), ("_id", ASCENDING)],
                name=CLAIM_INDEX,
            ),
            IndexModel([("state", ASCENDING), ("lease_expires_at", ASCENDING)], name="bt_lease"),
            IndexModel(
                [("dedupe_slot", ASCENDING)],
                name="bt_dedupe",
                unique=True,
                **driver.only_present("dedupe_slot", collection),
            ),
            IndexModel([("expires_at", ASCENDING)], name="bt_expiry", expireAfterSeconds=0),
        ]
    )
    await dependencies.ensure_indexes(task_class)
