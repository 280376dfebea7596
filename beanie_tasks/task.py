"""The Task document: its fields, their validation, and thin public methods over the store.

Every command the queue sends lives in ``store``; this module turns stored documents
into typed tasks and back, and decides which transition each call means.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import socket
import time
import traceback as tracebacks
from collections.abc import AsyncIterator, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, TypeVar

from beanie import Document, PydanticObjectId
from beanie.exceptions import CollectionWasNotInitialized
from beanie.odm.fields import ExpressionField
from bson.errors import InvalidDocument
from pydantic import BaseModel, Field, PrivateAttr, ValidationError
from pymongo.errors import (
    ConnectionFailure,
    DocumentTooLarge,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
    WriteError,
)
from typing_extensions import Self

from beanie_tasks import admin, clock, dependencies, driver, executors, hooks, modelling
from beanie_tasks import store as storage
from beanie_tasks.clock import FAR_FUTURE, UtcDatetime, as_utc, utcnow
from beanie_tasks.errors import (
    LeaseLost,
    ModelNotInitialized,
    PushError,
    TaskCancelled,
    TaskError,
    TaskFailed,
    TransitionError,
    WaitTimeout,
)
from beanie_tasks.options import TaskOptions
from beanie_tasks.producing import PUSH_CHUNK, PushOutcome, PushStatus, dependency_levels
from beanie_tasks.redact import get_logger, redact_text
from beanie_tasks.states import PRIORITY_RANGE, TERMINAL_STATES, Priority, State
from beanie_tasks.store import Store
from beanie_tasks.wakeup import Wakeup, watch_end

log = get_logger("beanie_tasks")

__all__ = [
    "FAR_FUTURE",
    "Outage",
    "Task",
    "as_utc",
    "claim",
    "default_consumer_id",
    "describe_error",
    "explain_error",
    "traceback_of",
    "utcnow",
]

MAX_QUARANTINES_PER_POP = 100
# The longest traceback kept on a failed task: its last characters, where the error was raised.
MAX_TRACEBACK = 4000
# The server's code for a document over the 16 MB limit that the driver let through.
BSON_OBJECT_TOO_LARGE = 10334
# queue() looks for documents no claim can match once every this many recovery rounds.
SWEEP_EVERY_RECOVERIES = 10
TERMINAL_VALUES = frozenset(s.value for s in TERMINAL_STATES)
FINISHED = State.FINISHED.value
Given = TypeVar("Given")

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


_consumer_ids: dict[int, str] = {}


def default_consumer_id() -> str:
    """``host:pid``, worked out once per process (every claim names its consumer)."""
    pid = os.getpid()
    known = _consumer_ids.get(pid)
    if known is None:
        known = _consumer_ids[pid] = f"{socket.gethostname()}:{pid}"
    return known


def describe_error(error: BaseException | str | None) -> str | None:
    if error is None or isinstance(error, str):
        return error
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def traceback_of(error: BaseException | str | None) -> str | None:
    """The formatted traceback of ``error``, redacted and cut to its last ``MAX_TRACEBACK`` characters."""
    if not isinstance(error, BaseException) or error.__traceback__ is None:
        return None
    text = redact_text("".join(tracebacks.format_exception(type(error), error, error.__traceback__)))
    return text if len(text) <= MAX_TRACEBACK else "...\n" + text[-MAX_TRACEBACK:]


def explain_error(error: BaseException | str) -> BaseException | str:
    """``error``, or for Beanie's bare ``CollectionWasNotInitialized`` one that says which model to register and how."""
    if not isinstance(error, CollectionWasNotInitialized):
        return error
    frame = error.__traceback__
    model = None
    while frame is not None:  # Beanie raises it from a classmethod of the model: its ``cls``
        candidate = frame.tb_frame.f_locals.get("cls")
        if isinstance(candidate, type) and issubclass(candidate, Document):
            model = candidate
        frame = frame.tb_next
    named = f"Beanie model {model.__module__}.{model.__qualname__}" if model is not None else "a Beanie model"
    explained = ModelNotInitialized(
        f"run() used {named}, which init_beanie never initialised in this worker process: list it in "
        "document_models (the CLI registers every Document in the modules it is given), or register it "
        "in a startup hook (Worker(on_startup=...), or beanie-tasks worker --setup module:function)"
    )
    return explained.with_traceback(error.__traceback__)


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


def push_failure(name: str, task_id: Any, error: PyMongoError | DocumentTooLarge, method: str) -> PushError:
    """The one-line error for a push the server or the driver refused (``method`` names the call to retry)."""
    if isinstance(error, DocumentTooLarge) or (isinstance(error, WriteError) and error.code == BSON_OBJECT_TOO_LARGE):
        return PushError(
            f"{name} is larger than MongoDB's 16 MB document limit; store big payloads elsewhere and push a reference"
        )
    if isinstance(error, WriteError):
        return PushError(f"could not push {name}: {redact_text(str(error))}")
    return PushError(
        f"could not push {name} {task_id}: {redact_text(describe_error(error) or '')}. "
        f"It may or may not be stored; calling {method} again on the same object is safe (it reuses this id)"
    )


def dedupe_churn(name: str, key: Any) -> PushError:
    return PushError(f"could not push {name} with dedupe_key {key!r}: the key kept changing hands")


def rejected(task: Given, error: str) -> PushOutcome[Given]:
    return PushOutcome(task, PushStatus.REJECTED, error=error)


def duplicate_of(task: Given, twin: dict[str, Any]) -> PushOutcome[Given]:
    """The outcome of a dedupe clash; a twin that does not validate is named by its id, with the reason."""
    task_class: Any = type(task)
    try:
        return PushOutcome(task, PushStatus.DUPLICATE, stored=task_class.model_validate(twin))
    except ValidationError as exc:
        reason = f"the in-flight task holding its dedupe_key does not validate: {rejection(task, exc)}"
        return PushOutcome(
            task, PushStatus.DUPLICATE, stored=task_class.model_construct(id=twin.get("_id")), error=reason
        )


def rejection(task: object, error: Exception) -> str:
    """One line for a task ``push_many`` could not even try to store."""
    if isinstance(error, ValidationError):
        return f"invalid {type(task).__name__}: {error.error_count()} validation error(s): " + "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()[:5]
        )
    return " ".join((describe_error(error) or "").split())


def refuse_whole_document_write(task_class: type, method: str) -> NoReturn:
    """Beanie's whole-document writes would bypass the lease guard and the dedupe slot."""
    raise TransitionError(
        f"{task_class.__name__}.{method}() is refused: a whole-document write would bypass the lease guard and "
        "the dedupe slot; use push() to store a task, and finish(), fail(), release(), cancel() or "
        "set_progress() to change one"
    )


@dataclass(frozen=True)
class PushDraft:
    """A validated task and the document its push stores (``Task.push_draft``), before any command."""

    checked: Any  # the validated copy of the task, with the id and fields the push chose
    document: dict[str, Any]
    links: tuple[dependencies.LinkField, ...]


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
    # Times the task was delivered again because its lease expired (its worker died or stalled).
    redeliveries: int = Field(default=0, ge=0)
    dedupe_key: str | None = Field(default=None, min_length=1)
    result: Any = None
    error: str | None = None
    # The error of the latest failed attempt that was retried; kept when a later attempt succeeds.
    last_error: str | None = None
    # The traceback of the last failed attempt (redacted, cut to its last MAX_TRACEBACK characters).
    traceback: str | None = None
    # The producer's trace context (W3C traceparent), stored at push when tracing is on (tracing.py).
    trace_context: dict[str, str] | None = None
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
    # What validation produced when the task was built (``modelling.validated_values``): while every
    # field still holds it, push() need not validate the task a second time.
    _validated: tuple[Any, ...] | None = PrivateAttr(default=None)

    if not TYPE_CHECKING:
        # Beanie's lazy_model intercepts every attribute read to parse fields on first use;
        # a task is always parsed whole (``lazy_parse`` below), so reads go straight to the object.
        __getattribute__ = object.__getattribute__

    def __init__(self, *args: Any, **data: Any) -> None:
        # Only values a caller passes are checked strictly; documents read back from a
        # client without ``tz_aware`` are normalised by ``as_utc`` instead.
        if not _reading_stored.get():
            for name in ("run_at", "created_at"):
                if data.get(name) is not None:
                    require_aware(name, data[name])
        if args:
            super().__init__(*args, **data)  # pydantic refuses positional arguments, in its own words
        else:
            # What ``BaseModel.__init__`` does, without Beanie's check that the class was initialised
            # (pushing an unregistered class raises NotRegistered, which says what to do).
            self.__pydantic_validator__.validate_python(data, self_instance=self)
        private = self.__pydantic_private__
        if private is not None:  # always, once validated; set as pydantic would, without its per-name dispatch
            private["_validated"] = modelling.validated_values(self)

    @classmethod
    def lazy_parse(cls, data: dict[str, Any], fields: Any = None) -> Self:
        """Beanie's ``find(..., lazy_parse=True)``: a task is parsed whole, at once."""
        return cls.model_validate(data)

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:
        """Validate stored data, where naive dates are UTC (see ``as_utc``)."""
        if type(obj) is dict and not args and not kwargs and cls.__init__ is Task.__init__:
            # What ``BaseModel.__init__`` does, without the call chain: the base ``__init__`` only
            # checks callers' values (every claim builds a task here).
            task = cls.__new__(cls)
            cls.__pydantic_validator__.validate_python(obj, self_instance=task)
            return task
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
        partition = cls.task_options.partition_by
        if partition is not None and partition not in cls.model_fields:
            raise TypeError(f"{cls.__name__}: TaskSettings.partition_by names {partition!r}, which is not a field")
        dependencies.declared_links(cls)  # checks the link declarations at import
        modelling.speed_up_private_init(cls)

    @property
    def partition_value(self) -> Any:
        """This task's value of its class's ``partition_by`` field (None for a class without one)."""
        field_name = type(self).task_options.partition_by
        return getattr(self, field_name, None) if field_name is not None else None

    @property
    def is_settled(self) -> bool:
        """Whether this object already recorded its outcome (finish, fail or release)."""
        return self._settled

    # ------------------------------------------------------------------ setup

    @classmethod
    async def custom_init(cls) -> None:
        """Called by ``init_beanie``: registers the class, creates its indexes, measures the server's clock."""
        collection = driver.collection_of(cls)
        task_store = cls.new_store(collection)
        storage.register(cls, task_store, shares_by_inheritance=task_store.class_field is not None)
        await task_store.ensure_indexes()
        await clock.sync(collection)

    @classmethod
    def new_store(cls, collection: Any) -> Store:
        """A store for this class's commands on ``collection`` (async, or PyMongo's sync for ``push_sync``)."""
        inherits = bool(getattr(cls, "_inheritance_inited", False))
        settings = cls.get_settings()
        return Store(
            cls.__name__,
            collection,
            cls.task_options,
            class_id_key=settings.class_id,
            class_field=settings.class_id if inherits else None,
            class_ids=(lambda: [str(cls._class_id), *cls._children]) if inherits else None,
            partition_field=cls.task_options.partition_by,
        )

    @classmethod
    def task_store(cls) -> Store:
        """The store that sends this class's commands; raises ``NotRegistered`` before ``init_beanie``."""
        return storage.of(cls)

    @classmethod
    def collection(cls) -> Any:
        return driver.collection_of(cls)

    # ------------------------------------------------------ refused writes

    async def save(self, *args: Any, **kwargs: Any) -> NoReturn:  # type: ignore[override,unused-ignore]
        self._refuse("save")

    async def replace(self, *args: Any, **kwargs: Any) -> NoReturn:  # type: ignore[override,unused-ignore]
        self._refuse("replace")

    async def save_changes(self, *args: Any, **kwargs: Any) -> NoReturn:  # type: ignore[override,unused-ignore]
        self._refuse("save_changes")

    async def insert(self, *args: Any, **kwargs: Any) -> NoReturn:  # type: ignore[override,unused-ignore]
        self._refuse("insert")

    async def create(self, *args: Any, **kwargs: Any) -> NoReturn:  # type: ignore[override,unused-ignore]
        self._refuse("create")

    @classmethod
    async def insert_one(cls, *args: Any, **kwargs: Any) -> NoReturn:  # type: ignore[override,unused-ignore]
        refuse_whole_document_write(cls, "insert_one")

    @classmethod
    async def insert_many(cls, *args: Any, **kwargs: Any) -> NoReturn:  # type: ignore[override,unused-ignore]
        refuse_whole_document_write(cls, "insert_many")

    @classmethod
    async def replace_many(cls, *args: Any, **kwargs: Any) -> NoReturn:  # type: ignore[override,unused-ignore]
        refuse_whole_document_write(cls, "replace_many")

    def _refuse(self, method: str) -> NoReturn:
        refuse_whole_document_write(type(self), method)

    # --------------------------------------------------------------- producing

    async def push(
        self,
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        task_id: PydanticObjectId | None = None,
    ) -> Self:
        """Validate and insert this task; returns it, or the in-flight task with the same ``dedupe_key``.

        ``task_id`` chooses the id (a periodic schedule derives it from the slot).
        """
        if self.id is not None:
            raise TransitionError(f"{type(self).__name__} {self.id} was already pushed")
        task_store = type(self).task_store()
        draft = self.push_draft(task_store, task_store.now(), delay=delay, run_at=run_at, task_id=task_id)
        with hooks.around_push(draft.checked):
            plan = None
            if draft.links:
                plan = await dependencies.prepare_push(task_store, type(self).__name__, draft.links, draft.document)
            stored = await type(self)._insert(task_store, draft.document)
        if stored is not None:
            return stored
        self.adopt_push(draft)
        if plan is not None and await plan.register(draft.checked.id):
            current = await task_store.find_by_id(draft.checked.id, {"state": 1, "run_at": 1, "error": 1})
            if current is not None:
                self._adopt(current)
        return self

    def push_draft(
        self,
        task_store: Store,
        now: datetime,
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        task_id: PydanticObjectId | None = None,
    ) -> PushDraft:
        """Validate this task and build the document a push stores, without sending anything.

        Every producer (``push``, ``push_many``, ``push_sync``) builds its document here, so
        they cannot drift apart. Raises on bad input; dependency readiness is added later.
        """
        if delay is not None and run_at is not None:
            raise ValueError("pass either delay or run_at, not both")
        if run_at is not None:
            due = require_aware("run_at", run_at)
        elif delay is not None:
            due = now + as_delay(delay)
        else:
            due = self.run_at or now
        task_class = type(self)
        fields = self.__dict__
        # Private attributes read and set where pydantic keeps them, without its per-name dispatch.
        private = self.__pydantic_private__
        known = private or {}
        decided = {
            "state": State.CREATED,
            "run_at": due,
            "max_attempts": self.max_attempts or task_class.task_options.max_attempts,
            "id": task_id or known.get("_push_id") or PydanticObjectId(),
        }
        # A copy that is validated: again unless every field still holds what validation produced
        # when the task was built (a field set since, or one that can change in place, is validated).
        checked = modelling.copy_if_unchanged(self, known.get("_validated"), decided)
        if checked is None:
            checked = task_class.model_validate(dict(fields))
            modelling.assign(checked, decided)
        if private is not None:
            private["_push_id"] = checked.id
        else:
            self._push_id = checked.id
        hooks.before_push(checked)
        links = dependencies.declared_links(task_class)
        if links:
            dependencies.require_pushed_links(task_class.__name__, links, fields)
        document = modelling.stored_document(checked)
        partition = task_store.partition_field
        if partition is not None and document.get(partition) in (None, ""):
            raise PushError(f"{type(self).__name__}.{partition} must be set: it is the class's partition_by field")
        if checked.dedupe_key is not None:
            document["dedupe_slot"] = checked.dedupe_key
        return PushDraft(checked, document, links)

    def adopt_push(self, draft: PushDraft) -> None:
        """This task was stored as ``draft``: take its id and the fields the push decided."""
        checked, stored = draft.checked.__dict__, draft.document
        decided = {
            "id": checked["id"],
            "max_attempts": checked["max_attempts"],
            "trace_context": checked["trace_context"],
        }
        for name in ("state", "run_at", "error"):
            if name in stored:
                decided[name] = stored[name]
        modelling.assign(self, decided)

    @classmethod
    async def push_many(cls, tasks: Iterable[Self], *, chunk_size: int = PUSH_CHUNK) -> list[PushOutcome[Self]]:
        """Push many tasks with one unordered ``insert_many`` per chunk of up to ``chunk_size``.

        Returns one ``PushOutcome`` per task, in order: PUSHED, DUPLICATE (its ``dedupe_key``
        is in flight: ``stored`` is the task holding it) or REJECTED (``error`` says why;
        nothing was stored), so one bad task never costs the others their push.
        Validation, dedupe and links work as in ``push()``; a task may link another task
        of the same call, which is then stored first. A lost connection raises PushError:
        tasks that have an id by then were pushed, and pushing the others again is safe.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size!r}")
        batch = list(tasks)
        for task_class in {type(task) for task in batch if isinstance(task, cls)}:
            task_class.task_store()  # an unregistered class is the caller's mistake: raise before storing any
        outcomes: dict[int, PushOutcome[Self]] = {}
        lent: list[int] = []
        seen: set[int] = set()
        for position, task in enumerate(batch):
            if not isinstance(task, cls):
                outcomes[position] = rejected(task, f"{type(task).__name__} is not a {cls.__name__}")
            elif id(task) in seen:
                outcomes[position] = rejected(task, "the same object appears earlier in this call")
            elif task.id is not None:
                outcomes[position] = rejected(task, f"{type(task).__name__} {task.id} was already pushed")
            else:
                # Its id now, so that another task of the same call can link it.
                task.id = task._push_id = task._push_id or PydanticObjectId()
                lent.append(position)
                seen.add(id(task))
        try:
            drafts: dict[int, PushDraft] = {}
            for position in lent:
                task = batch[position]
                try:
                    task_store = type(task).task_store()
                    drafts[position] = task.push_draft(task_store, task_store.now())
                except (ValidationError, ValueError, TypeError, TaskError) as exc:
                    outcomes[position] = rejected(task, rejection(task, exc))
            in_batch = {batch[position].id: position for position in lent}
            await cls._push_levels(batch, in_batch, drafts, outcomes, chunk_size)
        finally:
            for position in lent:
                outcome = outcomes.get(position)
                if outcome is None or not outcome.pushed:
                    batch[position].id = None
        return [outcomes[position] for position in range(len(batch))]

    @classmethod
    async def _push_levels(
        cls,
        batch: list[Self],
        in_batch: dict[Any, int],
        drafts: dict[int, PushDraft],
        outcomes: dict[int, PushOutcome[Self]],
        chunk_size: int,
    ) -> None:
        """Store the drafts dependencies first, one level at a time, each class's in chunks.

        ``in_batch`` maps the id lent to each task of the call to its position.
        """
        links_to: dict[int, set[int]] = {}
        for position, draft in drafts.items():
            try:
                linked = dependencies.linked_ids(type(batch[position]).__name__, draft.links, draft.document)
            except PushError as exc:
                outcomes[position] = rejected(batch[position], str(exc))
                continue
            links_to[position] = {in_batch[i] for i in linked if i in in_batch}
        # Tasks already decided (rejected above) need no ordering: their dependents are rejected below.
        levels, stuck = dependency_levels({p: wanted & links_to.keys() for p, wanted in links_to.items()})
        for position in stuck:
            outcomes[position] = rejected(batch[position], "it links tasks of the same call in a cycle")
        for level in levels:
            by_class: dict[type[Self], list[int]] = {}
            for position in level:
                missing = sorted(p for p in links_to[position] if not outcomes[p].pushed)
                if missing:
                    other = outcomes[missing[0]]
                    outcomes[position] = rejected(
                        batch[position],
                        f"it links {type(other.task).__name__} {batch[missing[0]].id} of the same call, "
                        f"which was not pushed ({other.status.value})",
                    )
                    continue
                by_class.setdefault(type(batch[position]), []).append(position)
            for task_class, positions in by_class.items():
                for start in range(0, len(positions), chunk_size):
                    await task_class._push_chunk(batch, drafts, positions[start : start + chunk_size], outcomes)

    @classmethod
    async def _push_chunk(
        cls,
        batch: list[Self],
        drafts: dict[int, PushDraft],
        positions: list[int],
        outcomes: dict[int, PushOutcome[Self]],
    ) -> None:
        task_store = cls.task_store()
        prepared = await dependencies.prepare_pushes(
            task_store, cls.__name__, [(drafts[p].links, drafts[p].document) for p in positions]
        )
        plans: dict[int, dependencies.PushPlan | None] = {}
        for position, plan in zip(positions, prepared, strict=True):
            if isinstance(plan, PushError):
                outcomes[position] = rejected(batch[position], str(plan))
            else:
                plans[position] = plan
        sending = list(plans)
        in_chunk = {drafts[position].checked.id: position for position in sending}
        try:
            report = await task_store.insert_many([drafts[position].document for position in sending])
        except PyMongoError as exc:
            raise PushError(
                f"could not push {len(sending)} {cls.__name__} task(s): {redact_text(describe_error(exc) or '')}. "
                "They may or may not be stored; calling push_many() again with them is safe (each reuses its id)"
            ) from exc
        registering: list[tuple[dependencies.PushPlan, Any]] = []
        for index, position in enumerate(sending):
            task, draft = batch[position], drafts[position]
            if index in report.twins:
                outcomes[position] = duplicate_of(task, report.twins[index])
            elif index in report.refused:
                error = push_failure(cls.__name__, draft.checked.id, report.refused[index], "push_many()")
                outcomes[position] = rejected(task, str(error))
            elif index in report.churned:
                outcomes[position] = rejected(task, str(dedupe_churn(cls.__name__, draft.document["dedupe_slot"])))
            else:
                task.adopt_push(draft)
                hooks.after_push(draft.checked, None)
                plan = plans[position]
                if plan is not None:
                    registering.append((plan, draft.checked.id))
                outcomes[position] = PushOutcome(task, PushStatus.PUSHED, stored=task)
        for task_id in await dependencies.register_many(task_store, registering):
            current = await task_store.find_by_id(task_id, {"state": 1, "run_at": 1, "error": 1})
            if current is not None:
                batch[in_chunk[task_id]]._adopt(current)

    # ------------------------------------------------------------ from sync code

    def push_sync(
        self,
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        task_id: PydanticObjectId | None = None,
    ) -> Self:
        """``push()`` for code without an event loop (Flask, Django, scripts), through PyMongo's sync client.

        Needs ``beanie_tasks.sync.init(uri, document_models=[...])`` once per process. The
        same validation, dedupe and links as ``push()``; one command for a task without links.
        """
        if self.id is not None:
            raise TransitionError(f"{type(self).__name__} {self.id} was already pushed")
        sync_store = storage.sync_of(type(self))
        draft = self.push_draft(sync_store.shape, sync_store.now(), delay=delay, run_at=run_at, task_id=task_id)
        with hooks.around_push(draft.checked):
            plan = dependencies.prepare_push_sync(sync_store, type(self).__name__, draft.links, draft.document)
            stored = type(self)._insert_sync(sync_store, draft.document)
        if stored is not None:
            return stored
        self.adopt_push(draft)
        if plan is not None and dependencies.register_sync(plan, sync_store, draft.checked.id):
            current = sync_store.find_by_id(draft.checked.id, {"state": 1, "run_at": 1, "error": 1})
            if current is not None:
                self._adopt(current)
        return self

    @classmethod
    def _insert_sync(cls, sync_store: storage.SyncStore, document: dict[str, Any]) -> Self | None:
        """``_insert`` through the sync client: on a dedupe clash, the in-flight twin (None means inserted)."""
        key = document.get("dedupe_slot")
        partition = sync_store.shape.partition_of(document)
        for _ in range(storage.DEDUPE_ROUNDS):
            try:
                sync_store.insert(document)
                return None
            except DuplicateKeyError as exc:
                if key is None or not storage.names_dedupe_slot(exc.details or exc):
                    if sync_store.find_by_id(document["_id"], {"_id": 1}) is not None:
                        return None  # an ambiguous retry already stored it
                    raise
                twin = sync_store.find_dedupe_twin(key, partition)
                if twin is not None:
                    return cls.model_validate(twin)  # type: ignore[no-any-return,unused-ignore]
            except (PyMongoError, DocumentTooLarge) as exc:
                raise push_failure(cls.__name__, document["_id"], exc, "push_sync()") from exc
        raise dedupe_churn(cls.__name__, key)

    def wait_sync(self, timeout: float | timedelta | None = None, *, poll_interval: float = 0.5) -> Self:
        """``wait()`` for code without an event loop.

        Returns the FINISHED task freshly read; raises TaskFailed or WaitTimeout as ``wait()``
        does. A change stream on this task wakes it where the server has one (the task is
        read again at least every ``poll_interval`` all the same); otherwise it polls,
        backing off up to ``poll_interval``.
        """
        if self.id is None:
            raise TransitionError(f"cannot wait for a {type(self).__name__} that was never pushed")
        sync_store = storage.sync_of(type(self))
        limit = as_delay(timeout).total_seconds() if timeout is not None else None
        deadline = time.monotonic() + limit if limit is not None else None
        stream = sync_store.watch_end(self.id, poll_interval if limit is None else min(poll_interval, limit))
        pause = 0.0
        try:
            while True:
                document = sync_store.find_by_id(self.id)
                ended = self._ended(document)
                if ended is not None:
                    return ended
                remaining = deadline - time.monotonic() if deadline is not None else None
                if remaining is not None and remaining <= 0:
                    raise self._still_waiting(document, limit or 0.0)
                if stream is not None:
                    started = time.monotonic()
                    try:
                        # Returns at a change, or after the stream's longest wait; one that returns
                        # at once with nothing would spin, so it backs off as polling does.
                        if stream.try_next() is not None or time.monotonic() - started >= 0.01:
                            continue
                    except PyMongoError:
                        with contextlib.suppress(PyMongoError):
                            stream.close()
                        stream = None  # poll from now on
                pause = min(max(pause * 2, 0.05), poll_interval)
                time.sleep(pause if remaining is None else min(pause, remaining))
        finally:
            if stream is not None:
                with contextlib.suppress(PyMongoError):
                    stream.close()

    @classmethod
    async def _insert(cls, task_store: Store, document: dict[str, Any]) -> Self | None:
        """Insert; on a dedupe clash return the in-flight twin instead (None means inserted)."""
        key = document.get("dedupe_slot")
        partition = document.get(task_store.partition_field) if task_store.partition_field else None
        for _ in range(storage.DEDUPE_ROUNDS):
            try:
                await task_store.insert(document)
                return None
            except DuplicateKeyError as exc:
                if key is None or not storage.names_dedupe_slot(exc.details or exc):
                    if await task_store.find_by_id(document["_id"], {"_id": 1}) is not None:
                        return None  # an ambiguous retry already stored it
                    raise
                twin = await task_store.find_dedupe_twin(key, partition)
                if twin is not None:
                    return cls.model_validate(twin)  # type: ignore[no-any-return,unused-ignore]
                # The twin ended between the clash and the read: the key is free again.
            except (PyMongoError, DocumentTooLarge) as exc:
                raise push_failure(cls.__name__, document["_id"], exc, "push()") from exc
        raise dedupe_churn(cls.__name__, key)

    # --------------------------------------------------------------- claiming

    @classmethod
    def claim_filter(cls, now: datetime) -> dict[str, Any]:
        """The filter of a claim of this class at ``now`` (for reading; claims go through ``pop``)."""
        return cls.task_store().claim_filter(now)

    @classmethod
    async def pop(
        cls,
        *,
        consumer_id: str | None = None,
        lease_token: str | None = None,
        partition: Any = None,
        ignore_limits: bool = False,
    ) -> Self | None:
        """Claim the next ready task (RUNNING, leased to this consumer), or return None.

        ``partition`` keeps the claim to one value of the class's ``partition_by`` field;
        ``lease_token`` chooses the new lease's token; ``ignore_limits=True`` claims past
        the class's rate and concurrency limits, on purpose.
        """
        found = await claim(
            cls, 1, consumer_id=consumer_id, lease_token=lease_token, partition=partition, ignore_limits=ignore_limits
        )
        return found[0] if found else None

    @classmethod
    async def queue(
        cls,
        *,
        stop: asyncio.Event | None = None,
        consumer_id: str | None = None,
        use_change_stream: bool = True,
        partition: Any = None,
    ) -> AsyncIterator[Self]:
        """Yield claimed tasks forever; stop with ``break`` or by setting ``stop``.

        While idle it waits on a change stream (or polls with backoff), and every
        ``recovery_interval`` it recovers tasks whose leases expired.
        """
        options = cls.task_options
        task_store = cls.task_store()
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
                            next_sweep = loop.time() + SWEEP_EVERY_RECOVERIES * options.recovery_interval
                            await cls.set_aside_unclaimable()
                        if loop.time() >= next_recovery:
                            next_recovery = loop.time() + options.recovery_interval
                            await clock.refresh(task_store.raw)
                            await task_store.retry_undos()
                            await cls.recover_expired()
                        task = await cls.pop(consumer_id=consumer_id, partition=partition)
                    except ConnectionFailure as exc:
                        # The server is down or unreachable: keep trying, never give up the loop.
                        await outage.wait(exc, stop)
                        continue
                    except PyMongoError as exc:
                        # A refusal no set-aside could clear: report it, back off, never raise into the loop.
                        log.error("%s: the queue's command failed: %s", cls.__name__, redact_text(str(exc)))
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

    def _adopt(self, values: dict[str, Any]) -> None:
        fields = type(self).model_fields
        modelling.assign(self, {name: value for name, value in values.items() if name in fields})

    async def _apply(
        self,
        update: dict[str, Any],
        action: str,
        *,
        done: dict[str, Any] | None = None,
        guard_token: str | None = None,
        task_store: Store | None = None,
    ) -> None:
        """Write ``update`` under the lease guard; tell dependents when it ended the task.

        ``done`` fingerprints the document this very transition leaves behind: when the
        guard matches nothing because an earlier attempt of the same call was applied
        (a write whose reply was lost, then retried), that is success, not a lost lease.
        """
        if self.id is None:
            raise TransitionError(f"cannot {action} a {type(self).__name__} that was never pushed")
        task_store = task_store or type(self).task_store()
        partition = self.partition_value if task_store.partition_field is not None else None
        guard = task_store.lease_guard(self.id, self.lease_token, partition)
        fields = update.get("$set", {})
        ends = fields.get("state") in TERMINAL_VALUES
        returned: dict[str, Any] | None
        if ends:
            returned = await task_store.end(guard, update)
            matched = returned is not None
        else:
            returned, matched = None, await task_store.update_guarded(guard, update)
        if not matched:
            error = await self._why_not(task_store, action, done)
            if error is not None:
                if isinstance(error, LeaseLost) and not isinstance(error, TaskCancelled):
                    log.warning("%s", error)
                raise error
            log.info("%s %s: %s had already been applied (retried write)", type(self).__name__, self.id, action)
            if ends:
                returned = await task_store.find_by_id(self.id, storage.ENDED_PROJECTION)
        if ends and returned and returned.get("dependents_pending"):  # else nothing waits for it
            await dependencies.after_terminal(task_store, self.id, fields["state"], fields.get("error"), returned)

    async def _why_not(self, task_store: Store, action: str, done: dict[str, Any] | None) -> TransitionError | None:
        wanted = {"state": 1, "lease_token": 1, "consumer_id": 1} | dict.fromkeys(done or {}, 1)
        current = await task_store.find_by_id(self.id, wanted)
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

    async def _leave_running(self, token: str | None) -> None:
        """The task left RUNNING under ``token``: give back its concurrency slot (where its class caps keys)."""
        with contextlib.suppress(PyMongoError):
            await type(self).task_store().release_slot_of(self.concurrency_key, token)

    async def finish(self, result: Any = None) -> None:
        """Mark the task FINISHED and store ``result``; raises LeaseLost if the lease was lost."""
        task_store = type(self).task_store()
        fields = task_store.terminal_fields(State.FINISHED, task_store.now())
        fields["result"] = result if result is None else modelling.encode_value(result)
        token = self.lease_token
        mine = {"state": FINISHED, "lease_token": token}
        try:
            update = {"$set": fields, "$unset": {"dedupe_slot": ""}}
            await self._apply(update, "finish", done=mine, task_store=task_store)
        except (InvalidDocument, OverflowError, DocumentTooLarge) as exc:
            await self.fail(f"result could not be stored: {describe_error(exc)}", retry=False)
            return
        except WriteError as exc:
            if exc.code != BSON_OBJECT_TOO_LARGE:
                raise
            await self.fail(f"result could not be stored: {describe_error(exc)}", retry=False)
            return
        modelling.assign(self, fields | {"result": result})  # every one a field: no need to sort them out
        private = self.__pydantic_private__
        if private is not None:
            private["_settled"] = True  # as pydantic sets it, without its per-name dispatch
        else:
            self._settled = True
        if task_store.caps_keys:
            await self._leave_running(token)

    async def fail(
        self,
        error: BaseException | str | None = None,
        *,
        retry: bool = True,
        retry_in: float | timedelta | None = None,
    ) -> None:
        """Record a failed attempt: back to CREATED for a later retry while attempts remain, else FAILED.

        ``retry=False`` dead-letters the task at once, as does an exception the class's
        ``retry_on`` / ``dont_retry_on`` filters do not retry; ``retry_in`` overrides the
        backoff delay. A retried attempt's error goes to ``last_error``; ``error`` is the final one.
        """
        task_store = type(self).task_store()
        now = task_store.now()
        token = self.lease_token
        claimed = token is not None
        failures = self.attempts if claimed else self.attempts + 1
        limit = self.max_attempts or type(self).task_options.max_attempts
        message = describe_error(error)
        trace = traceback_of(error)
        if retry and failures < limit and type(self).task_options.retries(error):
            wait = as_delay(retry_in) if retry_in is not None else type(self).task_options.backoff.delay(failures)
            fields: dict[str, Any] = {
                "state": State.CREATED.value,
                "last_error": message,
                "traceback": trace,
                "lease_token": None,
                "lease_expires_at": None,
            }
            if not claimed:
                await self._retry_unclaimed(task_store, fields, now + wait)
                self._adopt(fields | {"attempts": failures})
                self._settled = True
                return
            fields["run_at"] = now + wait
            update: dict[str, Any] = {"$set": fields}
            # Recovery would leave a different error, a new claim a different state or attempts.
            mine = {"state": State.CREATED.value, "lease_token": None, "attempts": self.attempts, "last_error": message}
        else:
            fields = task_store.terminal_fields(State.FAILED, now) | {"error": message, "traceback": trace}
            update = {"$set": fields, "$unset": {"dedupe_slot": ""}}
            mine = {"state": State.FAILED.value, "lease_token": self.lease_token, "error": message}
            if not claimed:
                update["$inc"] = {"attempts": 1}
        await self._apply(update, "fail", done=mine)
        self._adopt(fields | {"attempts": failures})
        self._settled = True
        await self._leave_running(token)

    async def _retry_unclaimed(self, task_store: Store, fields: dict[str, Any], run_at: datetime) -> None:
        """A failed attempt of a task nobody claimed; a parked dependent stays parked until its links end."""
        if self.id is None:
            raise TransitionError(f"cannot fail a {type(self).__name__} that was never pushed")
        if not await task_store.retry_unclaimed(self.id, fields, run_at, self.partition_value):
            error = await self._why_not(task_store, "fail", None)
            raise error or TransitionError(f"cannot fail {type(self).__name__} {self.id}")
        if self.run_at != FAR_FUTURE:
            self.run_at = run_at

    async def cancel(self) -> bool:
        """Cancel a CREATED or RUNNING task; a running worker sees it at its next heartbeat.

        Returns False when the task had already ended.
        """
        task_store = type(self).task_store()
        now = task_store.now()
        returned = await task_store.cancel(self.id, now, self.partition_value)
        if returned is None:
            return False
        self._adopt(task_store.terminal_fields(State.CANCELLED, now))
        await dependencies.after_terminal(task_store, self.id, State.CANCELLED.value, None, returned)
        return True

    async def heartbeat(self) -> None:
        """Extend this consumer's lease by the class's visibility timeout."""
        await self._extend({})

    async def set_progress(self, value: float, message: str | None = None) -> None:
        """Record progress (any number; a fraction 0..1 reads best) and extend the lease."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"progress must be a number, got {type(value).__name__}")
        await self._extend({"progress": float(value), "progress_message": message})

    def set_progress_sync(self, value: float, message: str | None = None, *, timeout: float = 30.0) -> None:
        """``set_progress`` from a sync ``def run()`` in the worker's thread (the worker's loop sends it).

        A cancel shows here too: it raises ``TaskCancelled``, so a loop that reports progress
        stops at its next report, although its thread cannot be interrupted.
        """
        loop = executors.worker_loop.get()
        if loop is None or loop.is_closed():
            raise RuntimeError(
                "set_progress_sync() works in a sync run() executed by a worker thread; "
                "in async code use await set_progress() (a run() under executor='process' cannot report progress)"
            )
        asyncio.run_coroutine_threadsafe(self.set_progress(value, message), loop).result(timeout)

    async def _extend(self, extra: dict[str, Any]) -> None:
        if self.lease_token is None:
            raise TransitionError(f"{type(self).__name__} {self.id} is not leased by this consumer")
        task_store = type(self).task_store()
        fields = {"lease_expires_at": task_store.now() + type(self).task_options.lease} | extra
        await self._apply({"$set": fields}, "extend the lease of")
        self._adopt(fields)

    async def release(self, *, delay: float | timedelta | None = None) -> None:
        """Give the task back unrun (for example at shutdown) without spending an attempt."""
        if self.lease_token is None:
            raise TransitionError(f"{type(self).__name__} {self.id} is not leased by this consumer")
        token = self.lease_token
        task_store = type(self).task_store()
        fields = {
            "state": State.CREATED.value,
            "run_at": task_store.now() + (as_delay(delay) if delay is not None else timedelta(0)),
            "lease_token": None,
            "lease_expires_at": None,
        }
        mine = {"state": State.CREATED.value, "lease_token": None, "attempts": self.attempts - 1}
        await self._apply({"$set": fields, "$inc": {"attempts": -1}}, "release", done=mine)
        self._adopt(fields | {"attempts": self.attempts - 1})
        self._settled = True
        await self._leave_running(token)

    @classmethod
    async def finish_many(cls, pairs: Sequence[tuple[Self, Any]]) -> list[Self]:
        """Finish many leased tasks of this class with one ``bulk_write``; returns those finished.

        Each update is guarded by the task's lease, as ``finish()`` is; those whose lease
        was lost (or that were cancelled) are left untouched and not returned.
        """
        task_store = cls.task_store()
        now = task_store.now()
        terminal = task_store.terminal_fields(State.FINISHED, now)
        updates = [
            (
                task_store.lease_guard(task.id, task.lease_token, task.partition_value),
                {"$set": terminal | {"result": modelling.encode_value(result)}, "$unset": {"dedupe_slot": ""}},
            )
            for task, result in pairs
        ]
        tokens = {task.id: task.lease_token for task, _ in pairs}
        finished_ids, pending = await task_store.finish_many(updates, tokens)
        for row in pending:
            await dependencies.after_terminal(task_store, row["_id"], State.FINISHED.value, None, row)
        done = []
        for task, result in pairs:
            if task.id in finished_ids:
                task._adopt(terminal | {"result": result})
                task._settled = True
                await task._leave_running(task.lease_token)
                done.append(task)
        return done

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
        elif isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
            # The consumer was stopped, not the task: give it back unspent, even while being cancelled.
            with contextlib.suppress(asyncio.CancelledError, TransitionError):
                await asyncio.shield(self.release())
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
        remaining = deadline - loop.time() if deadline is not None else None
        async with watch_end(collection, self.id, max_poll=poll_interval, timeout=remaining) as ending:
            while True:
                document = await storage.read_task(collection, self.id)
                ended = self._ended(document)
                if ended is not None:
                    return ended
                remaining = deadline - loop.time() if deadline is not None else None
                if remaining is not None and remaining <= 0:
                    raise self._still_waiting(document, as_delay(timeout).total_seconds())
                await ending.wait(remaining)

    def _ended(self, document: dict[str, Any] | None) -> Self | None:
        """What ``wait()`` and ``wait_sync()`` make of a fresh read: the FINISHED task, None while in flight.

        Raises TaskFailed for FAILED and CANCELLED, and TransitionError once the task is gone.
        """
        name = f"{type(self).__name__} {self.id}"
        if document is None:
            raise TransitionError(f"cannot wait for {name}: it no longer exists")
        if document.get("state") not in TERMINAL_VALUES:
            return None
        ended = type(self).model_validate(document)
        if ended.state is State.FINISHED:
            return ended  # type: ignore[no-any-return,unused-ignore]
        raise TaskFailed(f"{name} ended {ended.state.value}: {ended.error or 'no error recorded'}", ended)

    def _still_waiting(self, document: dict[str, Any] | None, waited: float) -> WaitTimeout:
        state = (document or {}).get("state")
        return WaitTimeout(
            f"{type(self).__name__} {self.id} is still {getattr(state, 'value', state)} after {waited:g} s"
        )

    # ------------------------------------------------------------- recovery

    @classmethod
    async def recover_expired(cls) -> int:
        """Deliver again tasks whose lease expired (their attempt given back), or end them FAILED
        once they were delivered ``max_redeliveries`` times.

        One ``update_many``; returns how many tasks were recovered. Then tells the
        dependents of this class's tasks whose finisher died before telling them.
        """
        task_store = cls.task_store()
        recovered = await task_store.recover_expired()
        if recovered:
            log.warning("%s: recovered %d task(s) with expired leases", cls.__name__, recovered)
        await dependencies.sweep(task_store, has_links=bool(dependencies.declared_links(cls)))
        return recovered

    # --------------------------------------------------------------- admin

    @classmethod
    async def counts(cls) -> dict[State, int]:
        """How many tasks of this class (and its subclasses) are in each state, zero included."""
        return await admin.counts(cls.task_store())

    @classmethod
    async def requeue_failed(cls, *, with_dependents: bool = False) -> int:
        """Give FAILED tasks a fresh set of attempts; returns how many were requeued (see ``admin``).

        ``with_dependents`` also requeues the dependents that failed because they failed.
        """
        return await admin.requeue_failed(cls.task_store(), with_dependents=with_dependents)

    @classmethod
    async def requeue_failed_report(cls, *, with_dependents: bool = False) -> admin.RequeueReport:
        """``requeue_failed``, returning how many were requeued and why the others stay FAILED."""
        return await admin.requeue_failed_report(cls.task_store(), with_dependents=with_dependents)

    @classmethod
    async def check_dependencies(cls) -> int:
        """Repair dependency bookkeeping now (deleted links, lost notifications); see ``dependencies.sweep``."""
        return await admin.check_dependencies(cls.task_store())

    @classmethod
    async def purge(cls, states: Iterable[State | str], *, force: bool = False) -> int:
        """Delete tasks in the given states; in-flight states need ``force=True``."""
        return await admin.purge(cls.task_store(), states, force=force)

    @classmethod
    async def set_aside_unclaimable(cls, *, limit: int = MAX_QUARANTINES_PER_POP) -> int:
        """Mark FAILED, with the reason, documents that no claim or recovery would ever pick up."""
        return await admin.set_aside_unclaimable(cls.task_store(), limit=limit)


modelling.speed_up_private_init(Task)

T = TypeVar("T", bound=Task)


def foreign_reason(task_class: type[Task], document: dict[str, Any]) -> str | None:
    """Why ``document`` names a class this one cannot run (None when it does not).

    Only classes registered in this process run; a class named by the database is
    never looked up or imported. A class that shares its collection through inheritance
    only ever claims its own scope, so this only fires for a stray class field.
    """
    field = task_class.get_settings().class_id
    named = document.get(field)
    if named is None:
        return None
    own = getattr(task_class, "_class_id", None)
    if own is not None and (named == own or named in getattr(task_class, "_children", {})):
        return None
    return f"document names class {str(named)[:100]!r} in {field}, not {task_class.__name__}; it was not run"


def model_for(task_class: type[T], document: dict[str, Any]) -> type[T]:
    """The registered class a claimed document belongs to: ``task_class`` or one of its subclasses."""
    named = document.get(task_class.get_settings().class_id)
    child = getattr(task_class, "_children", {}).get(named) if named is not None else None
    if isinstance(child, type) and issubclass(child, task_class) and storage.is_registered(child):
        return child
    return task_class


def quarantine_reason(task_class: type[Task], exc: ValidationError) -> str:
    return f"malformed {task_class.__name__} document: {exc.error_count()} validation error(s): " + "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
    )


async def claim(
    task_class: type[T],
    count: int,
    *,
    consumer_id: str | None = None,
    lease_token: str | None = None,
    partition: Any = None,
    ignore_limits: bool = False,
) -> list[T]:
    """Claim up to ``count`` tasks of ``task_class`` through the store's one claim, as typed tasks.

    A claimed document that cannot be modelled (malformed, or naming a foreign class) is
    set aside FAILED with its reason and the claim goes on, so it can never block the queue.
    """
    task_store = task_class.task_store()
    consumer = consumer_id or default_consumer_id()
    class_field = task_store.class_id_key
    tasks: list[T] = []
    one_by_one = False  # after a batch was refused: single claims, until the refused document is found
    for _ in range(MAX_QUARANTINES_PER_POP):
        wanted = 1 if one_by_one else count - len(tasks)
        try:
            documents = await task_store.claim(
                consumer, count=wanted, partition=partition, lease_token=lease_token, ignore_limits=ignore_limits
            )
        except OperationFailure as exc:
            if exc.code not in storage.DOCUMENT_REFUSALS or isinstance(exc, WriteConcernError):
                raise
            # The server refused the claim's update (a counter that is not a number, a document at
            # the 16 MB limit): set the document it was for aside, and claim the next one. A batch's
            # refusal does not say which document it was (the store has undone the batch): claim one
            # at a time, so the refused claim is the one for the next candidate.
            if wanted > 1:
                one_by_one = True
                continue
            if not await set_aside_unupdatable(task_store, partition, exc):
                raise
            one_by_one = False
            continue
        if not documents:
            break
        for document in documents:
            if storage.UNDECODABLE in document:
                reason = f"claimed document could not be decoded ({document[storage.UNDECODABLE]}); it was not run"
                guard = {"lease_token": document["lease_token"], "state": State.RUNNING.value}
                if document.get("_id") is not None:
                    guard["_id"] = document["_id"]
                await admin.set_aside(task_store, {"_id": document.get("_id")}, reason, guard)
                continue
            # A document naming no class is this class's own (the common case: no inheritance).
            model = task_class
            if class_field in document:
                foreign = foreign_reason(task_class, document)
                if foreign is not None:
                    await admin.set_aside(task_store, document, foreign)
                    continue
                model = model_for(task_class, document)
            try:
                tasks.append(model.model_validate(document))
            except ValidationError as exc:
                await admin.set_aside(task_store, document, quarantine_reason(task_class, exc))
        if len(tasks) >= count or len(documents) < wanted:
            break
    return tasks


async def set_aside_unupdatable(task_store: Store, partition: Any, error: OperationFailure) -> bool:
    """Set aside the next claim candidate, which the server just refused to update; False if there is none."""
    culprit = await task_store.next_candidate(partition)
    if culprit is None:
        return False
    reason = f"the claim could not update this document ({redact_text(describe_error(error) or '')[:200]}); not run"
    guard = {"_id": culprit["_id"], "state": State.CREATED.value}
    try:
        return await admin.set_aside(task_store, culprit, reason, guard)
    except OperationFailure:
        # Even the set-aside is refused (a document at the size limit): the smallest write that takes it
        # out of the queue ("FAILED" is shorter than "CREATED").
        return await task_store.update_guarded(guard, {"$set": {"state": State.FAILED.value}})
