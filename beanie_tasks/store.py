"""Every command the queue sends to MongoDB, and the stored schema those commands rely on.

This module works on raw collections and knows no Beanie model: a task class hands it
a ``Store`` built from plain values (its collection, its class scope, its settings).
Reads that the bookkeeping depends on go to the primary, whatever the app's default
read preference; every time that decides a lease or a due date is the server's
(``clock.now``).

Stored fields of a task document
--------------------------------
The model's own fields (``task.Task``): ``state``, ``priority``, ``created_at``,
``run_at``, ``attempts``, ``max_attempts``, ``dedupe_key``, ``result``, ``error``,
``traceback``, ``trace_context``, ``progress``, ``progress_message``, ``consumer_id``, ``lease_token``,
``lease_expires_at``, ``started_at``, ``finished_at``, ``expires_at``,
``rate_limit_key``, ``concurrency_key``, the subclass's own fields, and Beanie's
class field (``_class_id``) when several classes share the collection through
inheritance (``Settings.is_root``). Bookkeeping fields outside the model:

* ``dedupe_slot``: the ``dedupe_key``, present only while the task is in flight;
* on a dependent that waits for its links (``dependencies``):
  ``dep_blocked: true``; ``dep_run_at``, the ``run_at`` it was pushed with (``run_at``
  itself is ``FAR_FUTURE`` meanwhile); ``dep_wait``, one ``{i, f}`` per dependency not
  yet ended (its id and the link fields naming it); ``dep_links``, per field
  ``{kind, on_failure, c, n, ok, bad, cause}`` (the linked collection, how many links,
  how many ended well or badly, the last bad one); ``dep_ttl``, the class's ``ttl``
  (a process that never imported the class may end it);
* ``dep_failed: true`` on a task failed because of its links;
* on a waiting task whose ``concurrency_key`` is full: ``limit_parked: true`` and
  ``limit_run_at`` (its own ``run_at``, which is ``FAR_FUTURE`` until a slot frees);
* on a dependency: ``dependents_pending: true`` from the first dependent's push until
  every dependent was told it ended, and ``dependents_in``, the collections its
  dependents live in. The dependents themselves are found through the index on
  ``dep_wait.i``, so a dependency's document does not grow with its fan-out.

Indexes of a task collection (``P`` is the ``partition_by`` field, ``C`` the class
field, each present only when the class has one)
-----------------------------------------------------------------------------------
* ``bt_claim``: ``P, C, state, priority desc, run_at, _id``: the claim, in
  equality-sort-range order; also counts and the oldest ready task;
* ``bt_lease``: ``C, state, lease_expires_at``: lease recovery and its probe;
* ``bt_dedupe``: ``P, C, dedupe_slot``, unique, only documents with a slot;
* ``bt_expiry``: ``expires_at``, TTL (set only at a terminal transition);
* ``bt_dependents``: ``dependents_pending``, only where true: the repair sweep and its probe;
* ``bt_waiting``: ``dep_wait.i``, only parked dependents: telling dependents;
* ``bt_blocked``: ``dep_blocked, _id``, only parked dependents: the reconcile sweep and its probe;
* ``bt_finished``: ``C, state, finished_at desc, _id desc``: the dashboard's newest-ended lists
  and its finished-per-minute chart;
* ``bt_slot_key`` / ``bt_rate_key``: ``C, concurrency_key / rate_limit_key, state``, for a
  class with ``key_concurrency`` / ``key_rate_limit``: parking and unparking one key.

The maintenance probe
---------------------
One ``aggregate`` per database and round (``probe``): a ``$unionWith`` of ``Question``
branches, each matched on the fields of one of the indexes above, ``$limit``-ed, and
answering with the classes it found work for (``maintenance`` sends the repairs).

Change streams (opened by ``wakeup``)
-------------------------------------
``CLAIMABLE_CHANGES`` wakes idle consumers (inserts, updates that make a task CREATED or move
its ``run_at``); ``ENDING_CHANGES`` wakes ``wait()`` (updates to a terminal state, replaces,
deletes), one stream per collection per process, projected down to the document key.

Other collections of the database
---------------------------------
* ``beanie_tasks_limits``: rate windows ``{_id: "rate:<scope>:<key>:<window>", n,
  scope, expires_at}`` (TTL on ``expires_at``) and concurrency slots
  ``{_id: "slots:<scope>:<key>", holders: [{t: lease token, at}], scope}``, removed
  when empty; indexes ``bt_limit_expiry`` and ``bt_limit_holders`` (``scope, holders.at``);
* ``beanie_tasks_schedules``: one cursor per periodic class, ``{_id, last_slot,
  schedule, updated_at}``.
* ``beanie_tasks_workers``: one document per running worker, ``{_id: consumer id, host, pid,
  concurrency, classes, started_at, seen_at, expires_at}``, refreshed once per heartbeat
  interval; a TTL index on ``expires_at`` (``bt_worker_expiry``) removes dead workers.
"""

from __future__ import annotations

import re
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from bson.errors import InvalidBSON
from pymongo import ASCENDING, DESCENDING, IndexModel, ReturnDocument
from pymongo.errors import DocumentTooLarge, DuplicateKeyError, OperationFailure, PyMongoError, WriteError

from beanie_tasks import clock, driver
from beanie_tasks.errors import NotConfigured, NotRegistered
from beanie_tasks.limits import CANDIDATES_PER_ROUND, LIMITED_ROUNDS, LIMITS_COLLECTION, Grant, KeyBlocks, LimitPolicy
from beanie_tasks.options import RateLimit, TaskOptions
from beanie_tasks.redact import get_logger
from beanie_tasks.states import IN_FLIGHT_STATES, TERMINAL_STATES, Priority, State, state_value

log = get_logger("beanie_tasks")

CLAIM_INDEX = "bt_claim"
CLAIM_SORT = [("priority", DESCENDING), ("run_at", ASCENDING), ("_id", ASCENDING)]
SCHEDULES_COLLECTION = "beanie_tasks_schedules"
WORKERS_COLLECTION = "beanie_tasks_workers"
FINISHED_INDEX = "bt_finished"
# How the dashboard's task lists sort, each served by one index (``_id_`` is MongoDB's own):
# name -> the sort, the index that serves it, whether the list must be pinned to one state.
LIST_SORTS: dict[str, tuple[list[tuple[str, int]], str, bool]] = {
    "newest": ([("_id", DESCENDING)], "_id_", False),
    "queue": (CLAIM_SORT, CLAIM_INDEX, True),
    "ended": ([("finished_at", DESCENDING), ("_id", DESCENDING)], FINISHED_INDEX, True),
}
IN_FLIGHT = sorted(s.value for s in IN_FLIGHT_STATES)
# The stored strings of the states the hot path writes (an enum's ``.value`` is a Python-level property).
STATE_VALUES = {state: state.value for state in State}
CREATED, RUNNING = State.CREATED.value, State.RUNNING.value
TERMINAL = sorted(s.value for s in TERMINAL_STATES)
# What a terminal write returns: enough to know whether dependents wait for it.
ENDED_PROJECTION = {"dependents_pending": 1, "dependents_in": 1}
# Dependents told per page of a notification, and documents per page of a sweep.
PAGE = 500
# A batch claim that lost every candidate to other consumers looks again this many times.
CLAIM_ROUNDS = 3
MAX_BATCH = 1000
DUPLICATE_KEY = 11000
# A push whose dedupe key is freed and taken again between its tries gives up after this many.
DEDUPE_ROUNDS = 5


# Server error codes that name the document a write was for, not the server or the command:
# a counter that is not a number (TypeMismatch), a document over the size limit after the update.
DOCUMENT_REFUSALS = frozenset({14, 10334, 17419})

# What makes a document one no claim or recovery would ever pick up: the condition, the
# field at fault and what is wrong with it (``Store.unclaimable``, the maintenance probe).
UNCLAIMABLE_CHECKS: tuple[tuple[dict[str, Any], str, str], ...] = (
    ({"state": {"$nin": [s.value for s in State]}}, "state", "is not a known state"),
    ({"state": {"$type": "array"}}, "state", "is an array, not a state"),
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
    (
        {"state": {"$in": IN_FLIGHT}, "attempts": {"$exists": True, "$not": {"$type": "number"}}},
        "attempts",
        "is not a number",
    ),
)

# The key marking a claimed document the driver could not decode: the claim took it,
# so the caller sets it aside by its lease token instead of leaving it RUNNING.
UNDECODABLE = "__beanie_tasks_undecodable__"


def undecodable(task_id: Any, token: str, error: Exception) -> dict[str, Any]:
    return {"_id": task_id, "lease_token": token, UNDECODABLE: f"{type(error).__name__}: {error}"[:300]}


@dataclass
class BulkInsert:
    """What ``Store.insert_many`` did, by position in the documents given; any other position was stored."""

    twins: dict[int, dict[str, Any]] = field(default_factory=dict)  # dedupe clash: the in-flight twin
    refused: dict[int, PyMongoError | DocumentTooLarge] = field(default_factory=dict)  # the driver's or server's no
    churned: list[int] = field(default_factory=list)  # the dedupe key kept changing hands: not stored


def names_dedupe_slot(details: Any) -> bool:
    """Whether a duplicate-key error is the dedupe index's (not ``_id``'s or a unique index of the app's)."""
    return "dedupe_slot" in str(details)


@dataclass(frozen=True)
class Ended:
    """A task that reached a terminal state (or vanished), as its dependents are told it."""

    collection: Any
    id: Any
    state: str
    error: str | None
    dependents_in: tuple[str, ...] = ()


class Store:
    """The commands of one task class, scoped to the class (and its subclasses) and partition."""

    def __init__(
        self,
        name: str,
        collection: Any,
        options: TaskOptions,
        *,
        class_field: str | None = None,
        class_ids: Callable[[], Sequence[str]] | None = None,
        partition_field: str | None = None,
        class_id_key: str = "_class_id",
    ) -> None:
        self.name = name
        self.raw = collection
        self.collection = driver.primary(collection)
        self.options = options
        self.class_field = class_field  # set only for classes that share a collection by inheritance
        self.class_id_key = class_id_key  # where Beanie would name a document's class, inheritance or not
        self._class_ids = class_ids
        self.partition_field = partition_field
        self.limits = LimitPolicy.of(options)
        self.blocks = KeyBlocks()
        self.limit_scope = f"{collection.name}:{name}"
        self._reconcile_after: Any = None
        # Worked out once: every claim and transition needs them.
        self.clock_client = clock.client_of(collection)
        self.traits = driver.traits(collection)
        self.claim_hint = driver.index_hint(collection, CLAIM_INDEX)
        self.lease = options.lease
        self.caps_keys = self.limits.key_concurrency is not None  # a task leaving RUNNING frees its key's slot
        self.limited = self.limits.active
        # Tokens of claims whose reply was lost and whose undo could not be sent yet.
        self.undo_later: set[str] = set()

    # ------------------------------------------------------------ scope

    def scope(self, class_ids: Sequence[str] | None = None) -> dict[str, Any]:
        """The filter that keeps every command to this class and its subclasses (or to ``class_ids`` of them)."""
        if self.class_field is None or self._class_ids is None:
            return {}
        ids = list(self._class_ids()) if class_ids is None else list(class_ids)
        return {self.class_field: ids[0] if len(ids) == 1 else {"$in": ids}}

    def class_ids(self) -> list[str] | None:
        """The class field values of this class and its subclasses (None: the collection has no class field)."""
        if self.class_field is None or self._class_ids is None:
            return None
        return list(self._class_ids())

    def now(self) -> datetime:
        return clock.now_of(self.clock_client)

    def terminal_fields(self, state: State, now: datetime, ttl: float | None = None) -> dict[str, Any]:
        ttl = self.options.ttl if ttl is None else ttl
        return {
            "state": STATE_VALUES[state],
            "finished_at": now,
            "expires_at": now + timedelta(seconds=ttl) if ttl is not None else None,
            "lease_expires_at": None,
        }

    # ---------------------------------------------------------- indexes

    def index_models(self) -> list[IndexModel]:
        lead = [(self.partition_field, ASCENDING)] if self.partition_field else []
        scope = [(self.class_field, ASCENDING)] if self.class_field is not None else []
        lead += scope
        collection = self.raw
        return [
            IndexModel(
                [*lead, ("state", ASCENDING), ("priority", DESCENDING), ("run_at", ASCENDING), ("_id", ASCENDING)],
                name=CLAIM_INDEX,
            ),
            # Lease recovery is never pinned to a partition: only the class leads.
            IndexModel(
                [*lead[len(lead) - len(scope) :], ("state", ASCENDING), ("lease_expires_at", ASCENDING)],
                name="bt_lease",
            ),
            IndexModel(
                driver.unique_among_present(lead, "dedupe_slot", collection),
                name="bt_dedupe",
                unique=True,
                **driver.only_present("dedupe_slot", collection),
            ),
            IndexModel([("expires_at", ASCENDING)], name="bt_expiry", expireAfterSeconds=0),
            IndexModel(
                [*scope, ("state", ASCENDING), ("finished_at", DESCENDING), ("_id", DESCENDING)], name=FINISHED_INDEX
            ),
            IndexModel(
                [("dependents_pending", ASCENDING)],
                name="bt_dependents",
                **driver.only_flagged("dependents_pending", collection),
            ),
            IndexModel(
                [("dep_wait.i", ASCENDING)], name="bt_waiting", **driver.only_flagged("dep_blocked", collection)
            ),
            IndexModel(
                [("dep_blocked", ASCENDING), ("_id", ASCENDING)],
                name="bt_blocked",
                **driver.only_flagged("dep_blocked", collection),
            ),
        ]

    def index_conflict(self, error: OperationFailure) -> NotRegistered | None:
        """A clear error when creating the indexes failed on an index of another shape (None: another failure)."""
        if error.code not in (85, 86):  # IndexOptionsConflict, IndexKeySpecsConflict
            return None
        return NotRegistered(
            f"{self.name}: collection {self.raw.name!r} has a queue index with other keys than this class "
            f"needs ({error.details.get('errmsg') if error.details else error}); several classes sharing a collection "
            "must agree on partition_by, and an index left by an older layout must be dropped once"
        )

    async def ensure_indexes(self) -> None:
        """Create the indexes (idempotent); a conflicting older index is a clear error, not a crash."""
        try:
            await self.raw.create_indexes(self.index_models())
        except OperationFailure as exc:
            conflict = self.index_conflict(exc)
            if conflict is None:
                raise
            raise conflict from exc
        if self.limits.active:
            limits = self.raw.database[LIMITS_COLLECTION]
            await limits.create_indexes(
                [
                    IndexModel([("expires_at", ASCENDING)], name="bt_limit_expiry", expireAfterSeconds=0),
                    IndexModel([("scope", ASCENDING), ("holders.at", ASCENDING)], name="bt_limit_holders"),
                ]
            )
            scope = [(self.class_field, ASCENDING)] if self.class_field is not None else []
            keyed = []
            if self.limits.key_concurrency is not None:
                keyed.append(
                    IndexModel([*scope, ("concurrency_key", ASCENDING), ("state", ASCENDING)], name="bt_slot_key")
                )
            if self.limits.key_rate is not None:
                keyed.append(
                    IndexModel([*scope, ("rate_limit_key", ASCENDING), ("state", ASCENDING)], name="bt_rate_key")
                )
            if keyed:
                await self.raw.create_indexes(keyed)

    # ----------------------------------------------------------- inserts

    async def insert(self, document: dict[str, Any]) -> None:
        if not self.traits.enforces_size:
            driver.check_document_size(self.raw, document)
        await self.collection.insert_one(document)

    async def insert_many(self, documents: Sequence[dict[str, Any]]) -> BulkInsert:
        """Insert with one unordered ``insert_many``, plus one ``find`` per round of dedupe clashes.

        A clash on the dedupe index finds the in-flight twin; one whose twin ended in
        between is tried again. An ``_id`` clash is an earlier attempt of the same push
        that landed: stored. Anything else the server refuses is reported, not raised.
        """
        report = BulkInsert()
        pending = list(range(len(documents)))
        for _ in range(DEDUPE_ROUNDS):
            for position in list(pending):
                try:
                    driver.check_document_size(self.raw, documents[position])
                except DocumentTooLarge as exc:
                    report.refused[position] = exc
                    pending.remove(position)
            batch = [documents[position] for position in pending]
            if not batch:
                return report
            try:
                failures = await driver.insert_many(self.collection, batch)
            except DocumentTooLarge:
                # The driver refuses a document over the limit before sending it: set those aside and
                # send the rest again (those already stored clash on ``_id``, which counts as stored).
                for index in driver.oversized(batch):
                    report.refused[pending[index]] = DocumentTooLarge("document over MongoDB's 16 MB limit")
                pending = [position for position in pending if position not in report.refused]
                continue
            clashes: dict[int, Any] = {}
            for failure in failures:
                position = pending[failure.index]
                if failure.code == DUPLICATE_KEY and "dedupe_slot" in failure.key_fields:
                    clashes[position] = documents[position]["dedupe_slot"]
                elif failure.code != DUPLICATE_KEY or failure.key_fields != ("_id",):
                    report.refused[position] = WriteError(failure.message, failure.code, {"errmsg": failure.message})
            pending = []
            if clashes:
                twins = await self.find_dedupe_twins([documents[p] for p in clashes])
                for position, key in clashes.items():
                    twin = twins.get((self.partition_of(documents[position]), key))
                    if twin is not None:
                        report.twins[position] = twin
                    else:
                        pending.append(position)  # the twin ended between the clash and the read
            if not pending:
                return report
        report.churned.extend(pending)
        return report

    def partition_of(self, document: Mapping[str, Any]) -> Any:
        return document.get(self.partition_field) if self.partition_field is not None else None

    async def find_dedupe_twins(self, documents: Sequence[Mapping[str, Any]]) -> dict[tuple[Any, Any], dict[str, Any]]:
        """The in-flight tasks holding these documents' dedupe keys, by (partition value, key): one ``find``."""
        selector = self.scope() | {"dedupe_slot": {"$in": sorted({str(d["dedupe_slot"]) for d in documents})}}
        if self.partition_field is not None:
            selector[self.partition_field] = {"$in": list(dict.fromkeys(map(self.partition_of, documents)))}
        return {(self.partition_of(row), row["dedupe_slot"]): row async for row in self.collection.find(selector)}

    async def find_by_id(self, task_id: Any, projection: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        found: dict[str, Any] | None = await self.collection.find_one({"_id": task_id}, projection)
        return found

    def dedupe_twin_filter(self, key: str, partition: Any = None) -> dict[str, Any]:
        """The in-flight task of this class holding dedupe ``key`` (in ``partition``, for a partitioned class)."""
        selector = self.scope() | {"dedupe_slot": key}
        if self.partition_field is not None:
            selector[self.partition_field] = partition
        return selector

    async def find_dedupe_twin(self, key: str, partition: Any = None) -> dict[str, Any] | None:
        found: dict[str, Any] | None = await self.collection.find_one(self.dedupe_twin_filter(key, partition))
        return found

    # ------------------------------------------------------------- claim

    def claim_filter(self, now: datetime, partition: Any = None) -> dict[str, Any]:
        """Ready tasks of this class: CREATED (a string, never an array) and due."""
        selector: dict[str, Any] = {}
        if self.partition_field is not None and partition is not None:
            selector[self.partition_field] = partition
        # "state.0" exists only on an array, which an equality on "state" would match too.
        if self.class_field is not None:
            selector |= self.scope()
        return selector | {"state": CREATED, "state.0": {"$exists": False}, "run_at": {"$lte": now}}

    async def next_due(self, now: datetime, partition: Any = None) -> datetime | None:
        """When this class's earliest waiting task falls due (after ``now``); None if none waits.

        Read once each time a wake-up stream opens: the stream announces later due times
        itself. ``priority`` is listed so the planner merges ``bt_claim`` scans per priority
        in ``run_at`` order instead of sorting every waiting task.
        """
        selector = self.claim_filter(now, partition) | {
            "priority": {"$in": [int(p) for p in Priority]},
            "run_at": {"$gt": now, "$lt": clock.FAR_FUTURE},
        }
        row = await self.collection.find_one(selector, {"run_at": 1}, sort=[("run_at", ASCENDING)])
        value = row.get("run_at") if row is not None else None
        return clock.as_utc(value) if isinstance(value, datetime) else None

    def _claim_update(self, now: datetime, consumer_id: str, token: str) -> dict[str, Any]:
        return {
            "$set": {
                "state": RUNNING,
                "consumer_id": consumer_id,
                "lease_token": token,
                "lease_expires_at": now + self.lease,
                "started_at": now,
            },
            "$inc": {"attempts": 1},
        }

    def _hint(self, partition: Any) -> dict[str, Any]:
        # An unpinned claim on a partitioned class has no index prefix to use: leave it to the planner.
        if self.partition_field is not None and partition is None:
            return {}
        return self.claim_hint

    async def claim(
        self,
        consumer_id: str,
        *,
        count: int = 1,
        partition: Any = None,
        lease_token: str | None = None,
        ignore_limits: bool = False,
    ) -> list[dict[str, Any]]:
        """Claim up to ``count`` ready tasks: the one claim every consumer goes through.

        Each claimed document is RUNNING under a lease token chosen here, before the
        command is sent. One task is one ``findAndModify`` with the claim sort, pinned to
        ``bt_claim``. Several are a ``find`` of candidate ids, one ``update_many`` of
        those still ready, and a ``find`` of those won under this call's token. A class
        with rate or concurrency limits claims one candidate at a time, after taking
        what its limits require (``ignore_limits=True`` skips them on purpose).
        """
        if self.limited and not ignore_limits:
            claimed: list[dict[str, Any]] = []
            for _ in range(count):
                document = await self._claim_limited(consumer_id, partition)
                if document is None:
                    break
                claimed.append(document)
            return claimed
        if count == 1:
            now = self.now()
            token = lease_token or uuid.uuid4().hex
            document = await self._claim_one(
                self.claim_filter(now, partition),
                self._claim_update(now, consumer_id, token),
                token,
                sort=CLAIM_SORT,
                **self._hint(partition),
            )
            return [document] if document is not None else []
        return await self._claim_many(consumer_id, count, partition, lease_token)

    async def _claim_one(
        self, selector: dict[str, Any], update: dict[str, Any], token: str, **options: Any
    ) -> dict[str, Any] | None:
        """One claiming ``findAndModify``. A lost reply is undone by its token; an undecodable one is marked.

        The token was chosen before the command, so if the reply never arrives (a dropped
        connection, a write concern error) the task it may have taken is given back at once,
        unspent, rather than left RUNNING under a lease nobody holds.
        """
        try:
            found: dict[str, Any] | None = await self.collection.find_one_and_update(
                selector, update, return_document=ReturnDocument.AFTER, **options
            )
        except InvalidBSON as exc:
            return undecodable(None, token, exc)
        except PyMongoError:
            await self.undo_quietly(token)
            raise
        return found

    async def claim_task(self, consumer_id: str, task_id: Any, partition: Any = None) -> dict[str, Any] | None:
        """Claim one named task if it is ready now, limits aside: how a test runs a task it just pushed.

        The same filter and update as every claim, narrowed to one ``_id``; None when the
        task is not CREATED and due (running, ended, scheduled later, or waiting on dependencies).
        """
        now = self.now()
        token = uuid.uuid4().hex
        return await self._claim_one(
            self.claim_filter(now, partition) | {"_id": task_id}, self._claim_update(now, consumer_id, token), token
        )

    async def undo_quietly(self, token: str) -> None:
        """``undo_claim``, or remember the token for ``retry_undos`` when the server cannot be reached."""
        try:
            await self.undo_claim(token)
        except PyMongoError:
            self.undo_later.add(token)

    async def retry_undos(self) -> None:
        """Give back the tasks of claims whose reply was lost while the server was unreachable."""
        for token in sorted(self.undo_later):
            await self.undo_claim(token)
            self.undo_later.discard(token)

    async def _claim_many(
        self, consumer_id: str, count: int, partition: Any, lease_token: str | None
    ) -> list[dict[str, Any]]:
        for _ in range(CLAIM_ROUNDS):
            now = self.now()
            ready = self.claim_filter(now, partition)
            cursor = self.collection.find(ready, {"_id": 1}, sort=CLAIM_SORT, limit=count, **self._hint(partition))
            candidates = [row["_id"] async for row in cursor]
            if not candidates:
                return []
            token = lease_token or uuid.uuid4().hex
            try:
                result = await self.collection.update_many(
                    ready | {"_id": {"$in": candidates}}, self._claim_update(now, consumer_id, token)
                )
            except PyMongoError:
                await self.undo_quietly(token)
                raise
            if result.modified_count == 0:
                continue  # every candidate went to another consumer: look again
            return await self._read_claimed(candidates, token)
        return []

    async def _read_claimed(self, candidates: list[Any], token: str) -> list[dict[str, Any]]:
        """The documents a batch claim won; one the driver cannot decode comes back marked, by id."""
        try:
            return [doc async for doc in self.collection.find({"_id": {"$in": candidates}, "lease_token": token})]
        except InvalidBSON:
            pass
        except PyMongoError:
            await self.undo_quietly(token)
            raise
        won = [row["_id"] async for row in self.collection.find({"lease_token": token}, {"_id": 1})]
        documents: list[dict[str, Any]] = []
        for task_id in won:
            try:
                document = await self.collection.find_one({"_id": task_id, "lease_token": token})
            except InvalidBSON as exc:
                documents.append(undecodable(task_id, token, exc))
                continue
            if document is not None:
                documents.append(document)
        return documents

    async def _claim_limited(self, consumer_id: str, partition: Any) -> dict[str, Any] | None:
        """Read the next candidates, take what a candidate's limits need, then claim exactly it under that token.

        A candidate whose key is full (or out of rate) is not claimed; its key's waiting
        tasks are parked instead, so no later claim, by any consumer, reads them again
        until the key has room: a claim's cost does not grow with the queued tasks of
        blocked keys, and a free key is reached at once. If another consumer claims the
        candidate first, everything taken is given back.
        """
        parked: list[str] = []
        try:
            # Every round claims, or parks or passes over what it read, so the rounds end; the bound is a guard.
            for _ in range(LIMITED_ROUNDS):
                now = self.now()
                if self.blocks.ready_in(now.timestamp()) > 0:
                    return None
                cursor = self.collection.find(
                    self.claim_filter(now, partition),
                    {"rate_limit_key": 1, "concurrency_key": 1},
                    sort=CLAIM_SORT,
                    limit=CANDIDATES_PER_ROUND,
                    **self._hint(partition),
                )
                candidates = [row async for row in cursor]
                if not candidates:
                    return None
                refused_rate: set[Any] = set()
                checked_page = False
                for index, candidate in enumerate(candidates):
                    rate_key, slot_key = candidate.get("rate_limit_key"), candidate.get("concurrency_key")
                    if slot_key in parked or rate_key in refused_rate:
                        continue  # parked a moment ago, with the rest of its key
                    token = uuid.uuid4().hex
                    grant = await self.acquire(rate_key, slot_key, token, parked=parked, refused_rate=refused_rate)
                    if grant is None:
                        if self.blocks.ready_in(self.now().timestamp()) > 0:
                            return None  # the class-wide rate is spent: nothing can start now
                        if not checked_page and parked and parked[-1] == slot_key:
                            # The page's first full key: check the rest of the page's keys at once.
                            checked_page = True
                            await self._park_full_keys(candidates[index + 1 :], parked)
                        continue
                    try:
                        document = await self._claim_one(
                            self.claim_filter(now, partition) | {"_id": candidate["_id"]},
                            self._claim_update(now, consumer_id, token),
                            token,
                        )
                    except PyMongoError:
                        await self.undo(grant)
                        raise
                    if document is not None:
                        return document
                    await self.undo(grant)  # another consumer was faster
            return None
        finally:
            if parked:
                await self._unpark_if_room(parked)

    # ------------------------------------------------------------ limits

    def _limits(self) -> Any:
        return self.raw.database[LIMITS_COLLECTION]

    def slot_id(self, key: str) -> str:
        return f"slots:{self.limit_scope}:{key}"

    async def acquire(
        self,
        rate_key: str | None,
        slot_key: str | None,
        token: str,
        *,
        parked: list[str] | None = None,
        refused_rate: set[Any] | None = None,
    ) -> Grant | None:
        """Take every token and slot a task with these keys needs, all or nothing; None means wait.

        A refused key parks its waiting tasks (until its rate window ends, or until a slot
        frees); ``parked`` collects the concurrency keys parked, for the caller's re-check.
        """
        wall = self.now().timestamp()
        grant = Grant(token=token)
        policy = self.limits
        if policy.rate is not None and not await self._take_rate("*", policy.rate, wall, grant):
            self.blocks.block_class(policy.rate.window(wall)[1])
            return None
        key_rate = policy.key_rate
        if key_rate is not None and rate_key is not None and not await self._take_rate(rate_key, key_rate, wall, grant):
            await self.undo(grant)
            await self._park_rate_key(rate_key, key_rate.window(wall)[1])
            if refused_rate is not None:
                refused_rate.add(rate_key)
            return None
        if policy.key_concurrency is not None and slot_key is not None:
            joined = await self._conditional_upsert(
                {"_id": self.slot_id(slot_key), f"holders.{policy.key_concurrency - 1}": {"$exists": False}},
                {"$push": {"holders": {"t": token, "at": self.now()}}, "$setOnInsert": {"scope": self.limit_scope}},
            )
            if not joined:
                await self.undo(grant)
                await self._park_slot_key(slot_key)
                if parked is not None:
                    parked.append(slot_key)
                return None
            grant.slots.append(slot_key)
        return grant

    def _waiting_of_key(self, field_name: str, key: Any) -> dict[str, Any]:
        """This class's tasks of one limit key that a claim could pick (not parked, not waiting for links)."""
        return self.scope() | {
            field_name: key,
            "state": State.CREATED.value,
            "limit_parked": {"$exists": False},
            "dep_blocked": {"$exists": False},
        }

    async def _park_rate_key(self, key: str, window_ends: float) -> None:
        """Move a key's waiting tasks to the end of its full rate window: no claim reads them before then."""
        opens = datetime.fromtimestamp(window_ends, timezone.utc)
        await self.collection.update_many(
            self._waiting_of_key("rate_limit_key", key) | {"run_at": {"$lt": opens}}, {"$set": {"run_at": opens}}
        )

    async def _park_slot_key(self, key: Any) -> None:
        """Park a full concurrency key's waiting tasks (their ``run_at`` kept in ``limit_run_at``)."""
        await self.collection.update_many(
            self._waiting_of_key("concurrency_key", key),
            [{"$set": {"limit_run_at": "$run_at", "run_at": clock.FAR_FUTURE, "limit_parked": True}}],
        )

    async def _park_full_keys(self, candidates: list[dict[str, Any]], parked: list[str]) -> None:
        """Park, in two commands, every key among ``candidates`` whose slots are all taken.

        One read of their slot documents and one ``update_many``, so a page of candidates of
        many blocked keys costs a fixed handful of commands; the join stays the atomic check.
        """
        cap = self.limits.key_concurrency
        keys = {str(c["concurrency_key"]) for c in candidates if c.get("concurrency_key") is not None} - set(parked)
        if cap is None or not keys:
            return
        rows = self._limits().find({"_id": {"$in": [self.slot_id(k) for k in keys]}}, {"holders": 1})
        full_ids = {row["_id"] async for row in rows if len(row.get("holders") or []) >= cap}
        full = sorted(key for key in keys if self.slot_id(key) in full_ids)
        if full:
            await self._park_slot_key({"$in": full})
            parked.extend(full)

    async def _unpark_slot_key(self, key: str) -> None:
        """A slot of ``key`` freed: its parked tasks are due again at their own ``run_at``."""
        parked = self.scope() | {"concurrency_key": key, "limit_parked": True, "state": State.CREATED.value}
        result = await self.collection.update_many(
            parked, [{"$set": {"run_at": "$limit_run_at", "limit_run_at": "$$REMOVE", "limit_parked": "$$REMOVE"}}]
        )
        if result.modified_count:
            await driver.remove_fields_after_pipeline(
                self.collection, parked | {"run_at": {"$lt": clock.FAR_FUTURE}}, ["limit_run_at", "limit_parked"]
            )

    async def _unpark_if_room(self, keys: list[str]) -> None:
        """Re-check keys parked by this claim: a slot that freed in between must not leave them parked."""
        cap = self.limits.key_concurrency
        if cap is None:
            return
        rows = self._limits().find({"_id": {"$in": [self.slot_id(k) for k in keys]}}, {"holders": 1})
        full = {row["_id"] async for row in rows if len(row.get("holders") or []) >= cap}
        for key in dict.fromkeys(keys):
            if self.slot_id(key) not in full:
                await self._unpark_slot_key(key)

    async def _take_rate(self, key: str, rate: RateLimit, wall: float, grant: Grant) -> bool:
        index, ends = rate.window(wall)
        counter = f"rate:{self.limit_scope}:{key}:{index}"
        expires = datetime.fromtimestamp(ends, timezone.utc) + timedelta(seconds=max(rate.per, 60.0))
        ok = await self._conditional_upsert(
            {"_id": counter, "n": {"$lt": rate.count}},
            {"$inc": {"n": 1}, "$setOnInsert": {"scope": self.limit_scope, "expires_at": expires}},
        )
        if ok:
            grant.counters.append(counter)
        return ok

    async def _conditional_upsert(self, selector: dict[str, Any], update: dict[str, Any]) -> bool:
        """Apply ``update`` if ``selector`` matches, creating the document when it does not exist.

        When the document exists but the condition fails, the upsert collides on ``_id``:
        that is a refusal. Two first-comers racing to create it also collide, so the loser
        retries as a plain conditional update before it takes no for an answer.
        """
        limits = self._limits()
        try:
            await limits.update_one(selector, update, upsert=True)
            return True
        except DuplicateKeyError:
            update = {k: v for k, v in update.items() if k != "$setOnInsert"}
            result = await limits.update_one(selector, update)
            return bool(result.matched_count)

    async def undo(self, grant: Grant) -> None:
        """Give back everything a grant took, for a task that did not start after all."""
        limits = self._limits()
        for counter in grant.counters:
            await limits.update_one({"_id": counter, "n": {"$gt": 0}}, {"$inc": {"n": -1}})
        grant.counters.clear()
        for key in grant.slots:
            await self.leave_slot(key, grant.token)
        grant.slots.clear()

    async def leave_slot(self, key: str, token: str) -> None:
        """Give back the concurrency slot a task held under ``token`` (rate tokens stay spent).

        An empty slot document is removed, and the key's parked tasks are due again.
        """
        limits = self._limits()
        slot_id = self.slot_id(key)
        left = await limits.find_one_and_update(
            {"_id": slot_id}, {"$pull": {"holders": {"t": token}}}, return_document=ReturnDocument.AFTER
        )
        if left is not None and not left.get("holders"):
            await limits.delete_one({"_id": slot_id, "holders": {"$size": 0}})
        await self._unpark_slot_key(key)

    async def reconcile_slots(self, settled_before: datetime) -> int:
        """Free slots held by tasks that are no longer RUNNING under that lease (their worker died).

        Reads only the slots holding a token older than ``settled_before`` (indexed), so
        the round costs one query while every holder is young or alive.
        """
        if self.limits.key_concurrency is None:
            return 0
        limits = self._limits()
        holders: dict[str, str] = {}
        async for row in limits.find({"scope": self.limit_scope, "holders.at": {"$lt": settled_before}}):
            key = str(row["_id"]).removeprefix(f"slots:{self.limit_scope}:")
            for holder in row.get("holders") or []:
                if isinstance(holder, dict) and clock.as_utc(holder["at"]) < settled_before:
                    holders[holder["t"]] = key
        if not holders:
            return 0
        alive = {
            row["lease_token"]
            async for row in self.collection.find(
                {"state": State.RUNNING.value, "lease_token": {"$in": sorted(holders)}}, {"lease_token": 1}
            )
        }
        stale = sorted(set(holders) - alive)
        for token in stale:
            await self.leave_slot(holders[token], token)
        if stale:
            log.warning("%s: freed %d concurrency slot(s) of tasks that stopped running", self.name, len(stale))
        return len(stale)

    # ------------------------------------------------------- transitions

    def by_id(self, task_id: Any, partition: Any = None) -> dict[str, Any]:
        """A filter for one task; with the partition value, so a sharded collection routes it to one shard."""
        selector: dict[str, Any] = {"_id": task_id}
        if self.partition_field is not None and partition is not None:
            selector[self.partition_field] = partition
        return selector

    def lease_guard(self, task_id: Any, lease_token: str | None, partition: Any = None) -> dict[str, Any]:
        """The filter that makes a write apply only while the caller's view is current."""
        selector: dict[str, Any] = {"_id": task_id}  # ``by_id``, in place: every transition builds one
        if self.partition_field is not None and partition is not None:
            selector[self.partition_field] = partition
        selector["state"] = RUNNING if lease_token is not None else CREATED
        selector["lease_token"] = lease_token
        return selector

    async def end(self, guard: dict[str, Any], update: dict[str, Any]) -> dict[str, Any] | None:
        """A terminal write: returns what says whether dependents wait (None: the guard missed)."""
        if not self.traits.enforces_size:
            driver.check_storable(self.raw, update)
        found: dict[str, Any] | None = await self.collection.find_one_and_update(
            guard, update, projection=ENDED_PROJECTION, return_document=ReturnDocument.AFTER
        )
        return found

    async def update_guarded(self, guard: dict[str, Any], update: dict[str, Any]) -> bool:
        result = await self.collection.update_one(guard, update)
        return bool(result.matched_count)

    async def finish_many(
        self, updates: list[tuple[dict[str, Any], dict[str, Any]]], tokens: Mapping[Any, str | None]
    ) -> tuple[set[Any], list[dict[str, Any]]]:
        """Apply guarded finishes in one ``bulk_write``, then read back which landed.

        Returns the ids now FINISHED under their caller's token, and of those the ones
        whose dependents wait (one ``find`` reads both). When every guarded update matched,
        every task is finished, even one deleted before the read-back (a cleanup job, a
        short TTL): only the dependents are read then.
        """
        matched = await driver.bulk_update(self.collection, updates)
        projection = {"state": 1, "lease_token": 1, **ENDED_PROJECTION}
        cursor = self.collection.find({"_id": {"$in": list(tokens)}}, projection)
        finished: set[Any] = set(tokens) if matched == len(updates) else set()
        pending: list[dict[str, Any]] = []
        async for row in cursor:
            if row.get("state") == State.FINISHED.value and row.get("lease_token") == tokens[row["_id"]]:
                finished.add(row["_id"])
                if row.get("dependents_pending"):
                    pending.append(row)
        return finished, pending

    async def retry_unclaimed(
        self, task_id: Any, fields: dict[str, Any], run_at: datetime, partition: Any = None
    ) -> bool:
        """A failed attempt of a task nobody claimed: retried at ``run_at``, or kept parked while it waits.

        A parked dependent keeps ``run_at = FAR_FUTURE`` and gets ``run_at`` as the time it
        is released to, so a failure can never release it before its dependencies end.
        """
        guard = self.lease_guard(task_id, None, partition)
        update = {"$set": fields | {"run_at": run_at}, "$inc": {"attempts": 1}}
        if await self.update_guarded(guard | {"dep_blocked": {"$exists": False}}, update):
            return True
        parked = {"$set": fields | {"dep_run_at": run_at}, "$inc": {"attempts": 1}}
        return await self.update_guarded(guard | {"dep_blocked": True}, parked)

    async def release_slot_of(self, concurrency_key: str | None, token: str | None) -> None:
        """After a task left RUNNING: free the concurrency slot it held, where its class has caps."""
        if self.limits.key_concurrency is not None and concurrency_key is not None and token is not None:
            await self.leave_slot(concurrency_key, token)

    async def cancel(self, task_id: Any, now: datetime, partition: Any = None) -> dict[str, Any] | None:
        return await self.end(
            self.by_id(task_id, partition) | {"state": {"$in": IN_FLIGHT}},
            {"$set": self.terminal_fields(State.CANCELLED, now), "$unset": {"dedupe_slot": ""}},
        )

    async def set_aside(self, guard: dict[str, Any], reason: str) -> dict[str, Any] | None:
        """Mark one document FAILED with ``reason`` (guarded, so a concurrent change wins)."""
        now = self.now()
        return await self.end(
            guard, {"$set": self.terminal_fields(State.FAILED, now) | {"error": reason}, "$unset": {"dedupe_slot": ""}}
        )

    # ----------------------------------------------------------- recovery

    async def recover_expired(self, class_ids: Sequence[str] | None = None) -> int:
        """Deliver again tasks whose lease expired, or end them FAILED past ``max_redeliveries``.

        A lost lease gives its attempt back (``max_attempts`` counts the handler's own
        failures) and counts a redelivery instead, so a crashed worker's task runs again
        by default while a task that keeps killing its workers still ends, FAILED.
        One ``update_many`` per recovery policy among the classes in scope (or ``class_ids``):
        a subclass's document is recovered under its own ``max_redeliveries`` and ``ttl``.
        """
        recovered = 0
        for options, ids in self.policies(class_ids):
            recovered += await self._recover_expired(options, ids)
        return recovered

    def policies(self, class_ids: Sequence[str] | None = None) -> list[tuple[TaskOptions, list[str] | None]]:
        """The classes in scope (or ``class_ids``) grouped by the recovery settings of each one's own registered class.

        One group, ``(options, None)``, for a collection without a class field; a class not
        registered in this process takes this store's settings.
        """
        ids = self.class_ids() if class_ids is None else list(class_ids)
        if ids is None:
            return [(self.options, None)]
        groups: dict[tuple[int, float | None], tuple[TaskOptions, list[str]]] = {}
        for class_id in ids:
            options = owner_of(self, class_id).options
            groups.setdefault((options.max_redeliveries, options.ttl), (options, []))[1].append(class_id)
        if len(groups) == 1 and class_ids is None:
            options, _ = next(iter(groups.values()))
            return [(options, None)]  # the whole scope, as one filter
        return list(groups.values())

    async def _recover_expired(self, options: TaskOptions, class_ids: Sequence[str] | None) -> int:
        now = self.now()
        limit = options.max_redeliveries
        redeliveries = {"$ifNull": ["$redeliveries", 0]}
        exhausted = {"$gte": [redeliveries, limit]}
        ttl = options.ttl
        expires = now + timedelta(seconds=ttl) if ttl is not None else None
        reason = (
            f"lease expired while running (worker died or stalled) {limit + 1} time(s); not delivered again"
            if limit
            else "lease expired while running (worker died or stalled); max_redeliveries is 0"
        )
        expired = self.scope(class_ids) | {
            "state": State.RUNNING.value,
            "lease_expires_at": {"$lt": now},
            "attempts": {"$type": "number"},  # anything else is set aside by the unclaimable sweep
        }
        result = await self.collection.update_many(
            expired,
            [
                {
                    "$set": {
                        "state": {"$cond": [exhausted, State.FAILED.value, State.CREATED.value]},
                        "error": {"$cond": [exhausted, reason, "$error"]},
                        "last_error": {
                            "$cond": [exhausted, "$last_error", "lease expired while running; delivered again"]
                        },
                        "attempts": {"$max": [0, {"$subtract": ["$attempts", 1]}]},
                        "redeliveries": {"$cond": [exhausted, redeliveries, {"$add": [redeliveries, 1]}]},
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
            await driver.remove_fields_after_pipeline(
                self.collection,
                self.scope(class_ids) | {"state": State.FAILED.value, "dedupe_slot": {"$exists": True}},
                ["dedupe_slot"],
            )
        return int(result.modified_count)

    async def undo_claim(self, token: str) -> int:
        """Give back, unspent, the tasks a claim took under ``token`` whose reply never arrived.

        Nobody holds that token (the caller never learnt which tasks it won), so no handler
        can have started: the tasks are CREATED again with their attempt refunded.
        """
        result = await self.collection.update_many(
            {"lease_token": token, "state": State.RUNNING.value},
            {
                "$set": {"state": State.CREATED.value, "lease_token": None, "lease_expires_at": None},
                "$inc": {"attempts": -1},
            },
        )
        if result.modified_count:
            log.warning("%s: gave back %d task(s) whose claim reply was lost", self.name, result.modified_count)
        return int(result.modified_count)

    async def next_candidate(self, partition: Any = None) -> dict[str, Any] | None:
        """The document the claim would take next (for naming one whose claim the server refused)."""
        found: dict[str, Any] | None = await self.collection.find_one(
            self.claim_filter(self.now(), partition), {"_id": 1}, sort=CLAIM_SORT, **self._hint(partition)
        )
        return found

    async def unclaimable(self, limit: int) -> list[tuple[dict[str, Any], dict[str, Any], str, str]]:
        """Documents no claim or recovery would ever pick up, with the guard, field and problem of each."""
        found = []
        for condition, field_name, problem in UNCLAIMABLE_CHECKS:
            scoped = self.scope() | condition
            async for row in self.collection.find(scoped, {field_name: 1}).limit(limit):
                found.append((row, {"_id": row["_id"], **condition}, field_name, problem))
        return found

    # -------------------------------------------------------------- admin

    async def count_by_state(self) -> dict[str, int]:
        pipeline: list[dict[str, Any]] = [{"$group": {"_id": "$state", "n": {"$sum": 1}}}]
        scope = self.scope()
        if scope:
            pipeline.insert(0, {"$match": scope})
        counts: dict[str, int] = {}
        for row in await driver.aggregate(self.collection, pipeline):
            if isinstance(row["_id"], str):
                state = state_value(row["_id"])
                counts[state] = counts.get(state, 0) + int(row["n"])
        return counts

    async def oldest_ready(self, now: datetime) -> datetime | None:
        row = await self.collection.find_one(self.claim_filter(now), {"run_at": 1}, sort=[("run_at", ASCENDING)])
        value = row.get("run_at") if row is not None else None
        return clock.as_utc(value) if isinstance(value, datetime) else None

    def requeueable(self) -> dict[str, Any]:
        """FAILED tasks that may run again: not failed because of a link, not waiting for one."""
        return self.scope() | {"state": State.FAILED.value, "dep_failed": None, "dep_blocked": None}

    @staticmethod
    def requeue_update(now: datetime, dedupe_key: str | None = None) -> list[dict[str, Any]]:
        """A fresh set of attempts, the failure kept as ``last_error`` (a pipeline, so one write does both)."""
        fields: dict[str, Any] = {
            "state": State.CREATED.value,
            "attempts": 0,
            "run_at": now,
            "finished_at": None,
            "expires_at": None,
            "lease_token": None,  # a fresh, unclaimed task: the last holder's token no longer applies
            "error": None,
        }
        if dedupe_key is not None:
            fields["dedupe_slot"] = dedupe_key
        literal = {name: {"$literal": value} for name, value in fields.items()}
        return [{"$set": {"last_error": {"$ifNull": ["$error", "$last_error"]}} | literal}]

    async def requeue(self, now: datetime, *, with_dependents: bool = False) -> tuple[int, int, list[dict[str, Any]]]:
        """Requeue the requeueable FAILED tasks: how many, how many a live dedupe twin kept FAILED,
        and (``with_dependents``) the requeued ones that have dependents, with their ``dependents_in``."""
        failed = self.requeueable()
        parents: list[dict[str, Any]] = []
        if with_dependents:
            cursor = self.collection.find(failed | {"dependents_in.0": {"$exists": True}}, {"dependents_in": 1})
            parents = [row async for row in cursor]
        result = await self.collection.update_many(failed | {"dedupe_key": None}, self.requeue_update(now))
        requeued, clashes = int(result.modified_count), 0
        kept: set[Any] = set()
        async for row in self.collection.find(failed | {"dedupe_key": {"$ne": None}}, {"dedupe_key": 1}):
            try:
                outcome = await self.collection.update_one(
                    {"_id": row["_id"], "state": State.FAILED.value},
                    self.requeue_update(now, row["dedupe_key"]),
                )
                requeued += outcome.modified_count
            except DuplicateKeyError:
                clashes += 1
                kept.add(row["_id"])
                log.info(
                    "%s %s stays FAILED: dedupe_key %r is in flight again", self.name, row["_id"], row["dedupe_key"]
                )
        return requeued, clashes, [row for row in parents if row["_id"] not in kept]

    async def unrequeueable(self, besides: Sequence[Any] = ()) -> tuple[int, int]:
        """FAILED tasks requeueing leaves alone: failed because a link failed, and failed while parked."""
        failed = self.scope() | {"state": State.FAILED.value}
        if besides:
            failed["_id"] = {"$nin": list(besides)}
        by_link = await self.collection.count_documents(failed | {"dep_failed": {"$ne": None}})
        parked = await self.collection.count_documents(failed | {"dep_failed": None, "dep_blocked": {"$ne": None}})
        return int(by_link), int(parked)

    def owns(self, document: Mapping[str, Any]) -> bool:
        """Whether ``document`` is of this store's class (or one of its subclasses)."""
        if self.class_field is None or self._class_ids is None:
            return True
        return document.get(self.class_field) in list(self._class_ids())

    async def delete_in_states(self, states: Iterable[str]) -> int:
        result = await self.collection.delete_many(self.scope() | {"state": {"$in": sorted(states)}})
        return int(result.deleted_count)

    # ---------------------------------------------------------- dashboard
    # Reads for the web dashboard, and the guarded one-task actions it offers (cancel is above).

    def list_filter(
        self,
        *,
        state: str | None = None,
        priority: int | None = None,
        dedupe_key: str | None = None,
        error_text: str | None = None,
        task_id: Any = None,
    ) -> dict[str, Any]:
        """The selection of a task list: this class, with each given filter as an equality (error: a substring)."""
        selector = self.scope()
        if task_id is not None:
            selector["_id"] = task_id
        if state is not None:
            selector["state"] = state
        if priority is not None:
            selector["priority"] = priority
        if dedupe_key is not None:
            selector["dedupe_key"] = dedupe_key
        if error_text:
            selector["error"] = {"$regex": re.escape(error_text), "$options": "i"}
        return selector

    def list_query(
        self, selector: Mapping[str, Any], sort_name: str, after: Mapping[str, Any] | None
    ) -> tuple[dict[str, Any], list[tuple[str, int]], dict[str, Any]]:
        """Filter, sort and hint of one keyset page: the rows strictly after ``after`` in the sort's order.

        Each sort of ``LIST_SORTS`` is served by the index it names, so a page costs the same
        at any depth: the position is carried in the filter, never skipped over.
        """
        sort, index, needs_state = LIST_SORTS[sort_name]
        if needs_state and not isinstance(selector.get("state"), str):
            raise ValueError(f"the {sort_name!r} order lists one state at a time")
        query = dict(selector)
        if after is not None:
            # A rooted $or, one branch per sort key, each with the whole filter: every branch is
            # one tight range of the index, already in the sort's order (merged, never sorted).
            branches: list[dict[str, Any]] = []
            for position, (name, direction) in enumerate(sort):
                branch = {earlier: after[earlier] for earlier, _ in sort[:position]}
                branch[name] = {"$lt" if direction == DESCENDING else "$gt": after[name]}
                overlap = set(branch) & set(selector)
                branches.append({"$and": [dict(selector), branch]} if overlap else dict(selector) | branch)
            query = {"$or": branches}
        # A partitioned class's claim index leads with the partition: the planner picks its own plan.
        hint = {} if index == CLAIM_INDEX and self.partition_field is not None else driver.index_hint(self.raw, index)
        return query, sort, hint

    async def list_page(
        self, selector: Mapping[str, Any], sort_name: str, after: Mapping[str, Any] | None, limit: int
    ) -> list[dict[str, Any]]:
        query, sort, hint = self.list_query(selector, sort_name, after)
        cursor = self.collection.find(query, sort=sort, limit=limit, **hint)
        return [row async for row in cursor]

    async def explain_list(self, selector: Mapping[str, Any], sort_name: str, after: Mapping[str, Any] | None) -> Any:
        """The server's plan for one list page (to prove it is index-backed)."""
        query, sort, hint = self.list_query(selector, sort_name, after)
        return await self.raw.find(query, sort=sort, limit=50, **hint).explain()

    async def ended_per_minute(self, since: datetime) -> list[dict[str, Any]]:
        """How many tasks FINISHED and FAILED in each UTC minute since ``since``, counted by the server
        on ``bt_finished``: ``{"_id": {"minute": "YYYY-MM-DDTHH:MM", "state": ...}, "n": ...}``."""
        match = self.scope() | {
            "state": {"$in": [State.FINISHED.value, State.FAILED.value]},
            "finished_at": {"$gte": since},
        }
        minute = {"$dateToString": {"format": "%Y-%m-%dT%H:%M", "date": "$finished_at"}}
        group = {"$group": {"_id": {"minute": minute, "state": "$state"}, "n": {"$sum": 1}}}
        return await driver.aggregate(self.collection, [{"$match": match}, group])

    async def find_in_scope(self, task_id: Any, projection: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """One task of this class (a sibling class's task sharing the collection is not found)."""
        found: dict[str, Any] | None = await self.collection.find_one(self.scope() | {"_id": task_id}, projection)
        return found

    async def count_ready(self, now: datetime) -> int:
        """The ready backlog: CREATED and due (counted on ``bt_claim``)."""
        return int(await self.collection.count_documents(self.claim_filter(now), **self._hint(None)))

    async def running_page(self, limit: int) -> list[dict[str, Any]]:
        projection = {"progress": 1, "progress_message": 1, "consumer_id": 1, "started_at": 1, "lease_expires_at": 1}
        selector = self.scope() | {"state": State.RUNNING.value}
        cursor = self.collection.find(selector, projection, sort=[("lease_expires_at", ASCENDING)], limit=limit)
        return [row async for row in cursor]

    async def requeue_one(self, task_id: Any, now: datetime) -> bool:
        """Give one FAILED task a fresh set of attempts (the guard of ``requeue``, for one id).

        False when it is not a requeueable FAILED task, or its ``dedupe_key`` is in flight again.
        """
        found = await self.collection.find_one(self.requeueable() | {"_id": task_id}, {"dedupe_key": 1})
        if found is None:
            return False
        key = found.get("dedupe_key")
        try:
            result = await self.collection.update_one(
                self.requeueable() | {"_id": task_id, "dedupe_key": key}, self.requeue_update(now, key)
            )
        except DuplicateKeyError:
            return False
        return bool(result.modified_count)

    async def run_now(self, task_id: Any, now: datetime) -> bool:
        """Make a waiting task due now; one still waiting for its links runs as soon as they are met.

        Only an unclaimed CREATED task moves, and never one parked by its concurrency key.
        """
        waiting = self.scope() | self.lease_guard(task_id, None) | {"limit_parked": {"$exists": False}}
        if await self.update_guarded(waiting | {"dep_blocked": {"$exists": False}}, {"$set": {"run_at": now}}):
            return True
        return await self.update_guarded(waiting | {"dep_blocked": True}, {"$set": {"dep_run_at": now}})

    async def set_priority(self, task_id: Any, priority: int) -> bool:
        """Change the priority of a task that is still waiting (unclaimed CREATED)."""
        return await self.update_guarded(
            self.scope() | self.lease_guard(task_id, None), {"$set": {"priority": priority}}
        )

    async def delete_ended(self, task_id: Any) -> bool:
        """Delete one task that ended and whose dependents were all told; a live task must be cancelled first."""
        result = await self.collection.delete_one(
            self.scope() | {"_id": task_id, "state": {"$in": TERMINAL}, "dependents_pending": {"$exists": False}}
        )
        return bool(result.deleted_count)

    async def find_waiting_dependents(self, collection_name: str, task_id: Any, limit: int) -> list[dict[str, Any]]:
        """Dependents in ``collection_name`` still waiting for ``task_id`` (served by ``bt_waiting``)."""
        cursor = self.collection_named(collection_name).find(
            {"dep_wait.i": task_id, "dep_blocked": True}, {"state": 1, "_class_id": 1}, limit=limit
        )
        return [row async for row in cursor]

    # ------------------------------------------------------- dependencies

    def collection_named(self, name: str) -> Any:
        return driver.primary(self.raw.database[name])

    async def states_of(self, collection_name: str, ids: Sequence[Any]) -> dict[Any, dict[str, Any]]:
        """State, error and dependents of the given tasks in one collection (missing ids are absent)."""
        cursor = self.collection_named(collection_name).find(*states_query(ids))
        return {row["_id"]: row async for row in cursor}

    def registration(self, ids: Sequence[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The filter and update telling in-flight dependencies that a dependent of this class waits."""
        return (
            {"_id": {"$in": list(ids)}, "state": {"$in": IN_FLIGHT}},
            {"$addToSet": {"dependents_in": self.raw.name}, "$set": {"dependents_pending": True}},
        )

    async def register_dependent(self, collection_name: str, ids: Sequence[Any]) -> int:
        """Tell in-flight dependencies that a dependent in this collection waits; returns how many matched."""
        result = await self.collection_named(collection_name).update_many(*self.registration(ids))
        return int(result.matched_count)

    async def pending_dependencies(self, limit: int, class_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Ended tasks of this class (or ``class_ids``) whose dependents may not all have been told (finisher died)."""
        selector = self.scope(class_ids) | {"dependents_pending": True, "state": {"$in": TERMINAL}}
        cursor = self.collection.find(selector, {**ENDED_PROJECTION, "state": 1, "error": 1}).limit(limit)
        return [row async for row in cursor]

    async def parked_page(self, after: Any, limit: int) -> list[dict[str, Any]]:
        """Parked dependents of this class in ``_id`` order from ``after``: the reconcile sweep's page."""
        selector = self.scope() | {"dep_blocked": True, "state": State.CREATED.value}
        if after is not None:
            selector["_id"] = {"$gt": after}
        projection = {"dep_wait": 1, "dep_links": 1, "dep_run_at": 1, "dep_ttl": 1, "dep_pk": 1, "state": 1}
        cursor = self.collection.find(selector, projection)
        return [row async for row in cursor.sort("_id", ASCENDING).limit(limit)]

    @property
    def reconcile_after(self) -> Any:
        """Where the next reconcile page starts (None: from the first parked task)."""
        return self._reconcile_after

    @reconcile_after.setter
    def reconcile_after(self, value: Any) -> None:
        self._reconcile_after = value


# ------------------------------------------------------------ the maintenance probe
# One ``aggregate`` per database asks every question a maintenance round has, for every
# collection and class at once (``maintenance``). Each question is a branch of indexed,
# ``$limit``-ed stages; its rows carry a marker ``m``: the class id it found work for
# (None in a collection without a class field) or a limit scope.

# The key naming, in each row of the probe, the question it answers.
PROBE_QUESTION = "bt_q"
# Documents a grouping question reads at most: one that reads this many may leave a class out.
PROBE_LIMIT = 1000


@dataclass(frozen=True)
class Question:
    """One branch of the maintenance probe: ``pipeline`` on ``collection`` (a name in the probed database).

    ``grouped`` rows count their class's documents (``n``); the others are at most one row, or
    (for malformed documents) the documents themselves.
    """

    collection: str
    pipeline: list[dict[str, Any]]
    grouped: bool = False


@dataclass(frozen=True)
class Answer:
    """What one question found: its rows, and whether they name every class there is work for."""

    rows: list[dict[str, Any]]
    complete: bool

    @property
    def markers(self) -> set[Any]:
        return {row.get("m") for row in self.rows}


def _class_of(class_field: str | None) -> Any:
    return f"${class_field}" if class_field is not None else None


def _among(class_field: str | None, class_ids: Sequence[str] | None) -> dict[str, Any]:
    if class_field is None or class_ids is None:
        return {}
    return {class_field: class_ids[0] if len(class_ids) == 1 else {"$in": list(class_ids)}}


def expired_leases_question(collection: str, class_field: str | None, class_id: str | None, now: datetime) -> Question:
    """Whether the class (every class, without a class field) has a RUNNING task whose lease expired.

    An equality on the class, then on ``state``, then the range: ``bt_lease``'s keys in
    order, so one index key answers it; one question per class keeps it so.
    """
    selector = _among(class_field, [class_id] if class_id is not None else None)
    selector |= {"state": State.RUNNING.value, "lease_expires_at": {"$lt": now}}
    marker = {"$project": {"_id": 0, "m": {"$literal": class_id}}}
    return Question(collection, [{"$match": selector}, {"$limit": 1}, marker])


def _grouped_question(
    collection: str, flag: str, rest: dict[str, Any], class_field: str | None, class_ids: Sequence[str] | None
) -> Question:
    # The first stage names the partial index's flag alone, so a planner that only uses an index
    # covering the whole filter (the bundled server's) serves it too; MongoDB merges the two stages.
    return Question(
        collection,
        [
            {"$match": {flag: True}},
            {"$match": _among(class_field, class_ids) | rest},
            {"$limit": PROBE_LIMIT},
            {"$group": {"_id": _class_of(class_field), "n": {"$sum": 1}}},
            {"$project": {"_id": 0, "m": "$_id", "n": 1}},
        ],
        grouped=True,
    )


def told_dependents_question(collection: str, class_field: str | None, class_ids: Sequence[str] | None) -> Question:
    """Which classes have an ended task whose dependents may not all have been told: ``bt_dependents``."""
    return _grouped_question(collection, "dependents_pending", {"state": {"$in": TERMINAL}}, class_field, class_ids)


def parked_question(collection: str, class_field: str | None, class_ids: Sequence[str] | None) -> Question:
    """Which classes have dependents parked until their links end: ``bt_blocked``."""
    return _grouped_question(collection, "dep_blocked", {"state": State.CREATED.value}, class_field, class_ids)


def stale_slots_question(scope: str, settled_before: datetime) -> Question:
    """Whether a concurrency slot of ``scope`` has a holder older than ``settled_before``: ``bt_limit_holders``."""
    selector = {"scope": scope, "holders.at": {"$lt": settled_before}}
    return Question(
        LIMITS_COLLECTION, [{"$match": selector}, {"$limit": 1}, {"$project": {"_id": 0, "m": {"$literal": scope}}}]
    )


def malformed_question(
    collection: str, class_field: str | None, class_ids: Sequence[str] | None, check: int, limit: int
) -> Question:
    """Documents failing ``UNCLAIMABLE_CHECKS[check]`` (with their class field), at most ``limit``."""
    condition, field_name, _ = UNCLAIMABLE_CHECKS[check]
    projection = {field_name: 1} | ({class_field: 1} if class_field is not None else {})
    selector = _among(class_field, class_ids) | condition
    return Question(collection, [{"$match": selector}, {"$limit": limit}, {"$project": projection}])


async def probe(database: Any, questions: Sequence[Question]) -> list[Answer]:
    """Ask every question in one ``aggregate`` on ``database`` (see ``driver.union_aggregate``)."""
    if not questions:
        return []
    branches = [
        (q.collection, [*q.pipeline, {"$addFields": {PROBE_QUESTION: {"$literal": i}}}])
        for i, q in enumerate(questions)
    ]
    found: list[list[dict[str, Any]]] = [[] for _ in questions]
    for row in await driver.union_aggregate(database, branches):
        found[int(row.pop(PROBE_QUESTION))].append(row)
    return [
        Answer(rows, complete=not q.grouped or sum(int(r.get("n", 0)) for r in rows) < PROBE_LIMIT)
        for q, rows in zip(questions, found, strict=True)
    ]


def states_query(ids: Sequence[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The filter and projection reading the state, error and dependents of the given tasks."""
    return {"_id": {"$in": list(ids)}}, {"state": 1, "error": 1, **ENDED_PROJECTION}


# ------------------------------------------------------------------ across collections
# Dependents may live in any collection of the database, of classes this process never
# imported: these commands take raw collections.

DEPENDENT_PROJECTION = {"state": 1, "dep_blocked": 1, "dep_links": 1, "dep_run_at": 1, "dep_ttl": 1, "dep_pk": 1}


def dependent_key(dependent_id: Any, snapshot: Mapping[str, Any] | None) -> dict[str, Any]:
    """A dependent's ``_id`` and, for a partitioned class, its partition key (``dep_pk``), so the write
    is routed to one shard by a process that never imported the dependent's class."""
    key = (snapshot or {}).get("dep_pk")
    return {"_id": dependent_id} | (dict(key) if isinstance(key, Mapping) else {})


async def hold_expiry(ended: Ended) -> None:
    """Keep a task with dependents to tell out of the TTL monitor's way until they are told."""
    await driver.primary(ended.collection).update_one(
        {"_id": ended.id, "dependents_pending": True, "expires_at": {"$ne": None}}, {"$set": {"expires_at": None}}
    )


async def waiting_dependents(collection: Any, dependency_id: Any, after: Any, limit: int) -> list[dict[str, Any]]:
    """Parked dependents in ``collection`` still waiting for ``dependency_id``, in ``_id`` order from ``after``."""
    selector: dict[str, Any] = {"dep_wait.i": dependency_id, "dep_blocked": True}
    if after is not None:
        selector["_id"] = {"$gt": after}
    projection = {"dep_wait": {"$elemMatch": {"i": dependency_id}}, "dep_pk": 1}
    cursor = driver.primary(collection).find(selector, projection, batch_size=limit)  # the page in one reply
    return [row async for row in cursor.sort("_id", ASCENDING).limit(limit)]


def tell_command(
    dependent_id: Any,
    dependency_id: Any,
    fields: Sequence[str],
    mark: dict[str, Any] | None,
    found: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The filter and update of ``tell``: guarded by the dependency's entry in ``dep_wait``, which it removes."""
    target = "ok" if mark is None else "bad"
    update: dict[str, Any] = {
        "$pull": {"dep_wait": {"i": dependency_id}},
        "$inc": {f"dep_links.{name}.{target}": 1 for name in fields},
    }
    if mark is not None:
        update["$set"] = {f"dep_links.{name}.cause": mark for name in fields}
    return dependent_key(dependent_id, found) | {"dep_wait.i": dependency_id}, update


async def tell(
    collection: Any,
    dependent_id: Any,
    dependency_id: Any,
    fields: Sequence[str],
    mark: dict[str, Any] | None,
    found: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Record on a dependent that one dependency ended (``mark`` None: it finished); returns its summary.

    Guarded by the dependency's entry in ``dep_wait``, which the same write removes: a
    repeat changes nothing and reads the summary instead. None: the dependent is gone.
    """
    pinned = driver.primary(collection)
    snapshot: dict[str, Any] | None = await pinned.find_one_and_update(
        *tell_command(dependent_id, dependency_id, fields, mark, found),
        projection=DEPENDENT_PROJECTION,
        return_document=ReturnDocument.AFTER,
    )
    if snapshot is None:
        snapshot = await pinned.find_one(dependent_key(dependent_id, found), DEPENDENT_PROJECTION)
    return snapshot


async def tell_page(
    collection: Any,
    dependency_id: Any,
    told: Sequence[tuple[Mapping[str, Any], Sequence[str]]],
    mark: dict[str, Any] | None,
) -> tuple[list[dict[str, Any]], OperationFailure | None]:
    """``tell`` for a page of dependents of one dependency: one bulk write, then one read of their summaries.

    ``told`` pairs each dependent's row (``waiting_dependents``) with the link fields naming
    the dependency. Each write is ``tell``'s own guarded one, so a repeat changes nothing;
    the summaries are read after every write landed, so of two dependencies ending at once
    at least one teller reads both outcomes. A page of one is ``tell`` itself (one
    ``findAndModify`` answers with the summary). A write the server refused is returned,
    not raised, once the others' summaries are read (a deleted dependent has none).
    """
    pinned = driver.primary(collection)
    refused: OperationFailure | None = None
    if len(told) == 1:
        row, fields = told[0]
        try:
            snapshot = await tell(collection, row["_id"], dependency_id, fields, mark, row)
        except OperationFailure as exc:
            return [], exc
        return ([snapshot] if snapshot is not None else []), None
    try:
        await driver.bulk_update(
            pinned, [tell_command(row["_id"], dependency_id, fields, mark, row) for row, fields in told]
        )
    except OperationFailure as exc:
        refused = exc
    ids = [row["_id"] for row, _ in told]
    # A limit as well as a batch size: the server then closes the cursor with its one reply.
    cursor = pinned.find({"_id": {"$in": ids}}, DEPENDENT_PROJECTION, limit=len(ids), batch_size=len(ids))
    return [row async for row in cursor], refused


async def release_page(collection: Any, ready: Sequence[tuple[Mapping[str, Any], Any]]) -> int:
    """``release_parked`` for many dependents (snapshot, run_at) in one bulk write; returns how many matched."""
    return await driver.bulk_update(
        driver.primary(collection), [release_command(snapshot, run_at) for snapshot, run_at in ready]
    )


def release_command(snapshot: Mapping[str, Any], run_at: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    return (
        dependent_key(snapshot["_id"], snapshot) | {"state": State.CREATED.value, "dep_blocked": True},
        {"$set": {"run_at": run_at}, "$unset": {"dep_blocked": "", "dep_wait": ""}},
    )


async def release_parked(collection: Any, snapshot: Mapping[str, Any], run_at: Any) -> bool:
    result = await driver.primary(collection).update_one(*release_command(snapshot, run_at))
    return bool(result.modified_count)


def fail_command(
    snapshot: Mapping[str, Any], reason: str, ttl: float | None, now: datetime
) -> tuple[dict[str, Any], dict[str, Any]]:
    fields = {
        "state": State.FAILED.value,
        "finished_at": now,
        "expires_at": now + timedelta(seconds=ttl) if ttl is not None else None,
        "lease_expires_at": None,
        "error": reason,
        "dep_failed": True,
    }
    return (
        dependent_key(snapshot["_id"], snapshot) | {"state": State.CREATED.value, "dep_blocked": True},
        {"$set": fields, "$unset": {"dep_blocked": "", "dedupe_slot": "", "dep_wait": ""}},
    )


async def fail_parked(
    collection: Any, snapshot: Mapping[str, Any], reason: str, ttl: float | None
) -> dict[str, Any] | None:
    """Fail a parked dependent whose links failed; returns what says whether its own dependents wait."""
    found: dict[str, Any] | None = await driver.primary(collection).find_one_and_update(
        *fail_command(snapshot, reason, ttl, clock.now(collection)),
        projection=ENDED_PROJECTION,
        return_document=ReturnDocument.AFTER,
    )
    return found


async def failed_by_links(collection: Any) -> list[dict[str, Any]]:
    """Every task in ``collection`` that ended FAILED because a link failed, with its bookkeeping."""
    cursor = driver.primary(collection).find(
        {"state": State.FAILED.value, "dep_failed": True}, {"dep_links": 1, "dependents_in": 1}
    )
    return [row async for row in cursor]


async def restore_dependent(collection: Any, document: Mapping[str, Any], fields: Mapping[str, Any]) -> bool:
    """Put a task failed by its links back in flight, with the fresh readiness in ``fields``.

    Its failure becomes ``last_error``. False: it changed since it was read. Raises
    ``DuplicateKeyError`` when its ``dedupe_key`` is taken by a live task.
    """
    update: dict[str, Any] = {
        "$set": {
            "state": State.CREATED.value,
            "attempts": 0,
            "finished_at": None,
            "expires_at": None,
            "lease_token": None,
            "lease_expires_at": None,
            "error": None,
            "last_error": document.get("error"),
            "dep_failed": None,
            **fields,
        }
    }
    if document.get("dedupe_key") is not None:
        update["$set"]["dedupe_slot"] = document["dedupe_key"]
    guard = dependent_key(document["_id"], document) | {
        "state": State.FAILED.value,
        "dep_failed": True,
        "error": document.get("error"),
    }
    result = await driver.primary(collection).update_one(guard, update)
    return bool(result.modified_count)


async def dependents_told(ended: Ended, ttl: float | None) -> None:
    """Every dependent of ``ended`` was told: clear the flag, and let the TTL monitor have it again."""
    fields: dict[str, Any] = {}
    if ttl is not None:
        fields["expires_at"] = clock.now(ended.collection) + timedelta(seconds=ttl)
    update: dict[str, Any] = {"$unset": {"dependents_pending": ""}}
    if fields:
        update["$set"] = fields
    await driver.primary(ended.collection).update_one(
        {"_id": ended.id, "state": ended.state, "dependents_pending": True}, update
    )


async def ensure_registered(collection: Any, dependency_id: Any, dependent_collection: str) -> dict[str, Any] | None:
    """Make sure an in-flight dependency knows a dependent waits in ``dependent_collection``.

    Returns the dependency's state and error when it is no longer in flight (None: it is,
    and now knows). A missing dependency returns ``{}``.
    """
    pinned = driver.primary(collection)
    registered = await pinned.find_one_and_update(
        {"_id": dependency_id, "state": {"$in": IN_FLIGHT}},
        {"$addToSet": {"dependents_in": dependent_collection}, "$set": {"dependents_pending": True}},
        projection={"_id": 1},
    )
    if registered is not None:
        return None
    current: dict[str, Any] | None = await pinned.find_one({"_id": dependency_id}, {"state": 1, "error": 1})
    return current if current is not None else {}


# ------------------------------------------------------------------ change streams
# The wake-up streams ``wakeup`` opens (through ``driver.open_change_stream``).


def claimable_changes(collections: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Inserts, and updates that make a task claimable (retry, release, unblocking, unparking).

    Only what a waiter reads is kept: the due time (``run_at``) of the inserted or updated
    task, so an event never carries a payload. With ``collections`` the stream watches a
    database and keeps the events of those collections only (one stream for every class).
    """
    claimable: dict[str, Any] = {
        "$or": [
            {"operationType": "insert"},
            {"updateDescription.updatedFields.state": State.CREATED.value},
            {"updateDescription.updatedFields.run_at": {"$exists": True}},
        ]
    }
    if collections is not None:
        claimable = {"ns.coll": {"$in": list(collections)}} | claimable
    keep = {"operationType": 1, "ns": 1, "fullDocument.run_at": 1, "updateDescription.updatedFields.run_at": 1}
    return [{"$match": claimable}, {"$project": keep}]


CLAIMABLE_CHANGES: list[dict[str, Any]] = claimable_changes()


# The changes that can end a task: an update that sets a terminal state, and anything but
# an insert or an update (a replace, a delete; a drop or rename, which name no document).
# Only the document's key and the changed state are kept (``_id``, the resume token, must stay).
ENDING_CHANGES: list[dict[str, Any]] = [
    {
        "$match": {
            "$or": [
                {
                    "operationType": "update",
                    "updateDescription.updatedFields.state": {"$in": TERMINAL},
                },
                {"operationType": {"$nin": ["insert", "update"]}},
            ]
        }
    },
    {"$project": {"documentKey": 1, "updateDescription.updatedFields.state": 1}},
]


# Every change, reduced to its key: the dashboard's live refresh.
ANY_CHANGES: list[dict[str, Any]] = [{"$project": {"documentKey": 1, "operationType": 1}}]


# ------------------------------------------------------------------ waiting and schedules


async def read_task(collection: Any, task_id: Any) -> dict[str, Any] | None:
    found: dict[str, Any] | None = await driver.primary(collection).find_one({"_id": task_id})
    return found


def schedules(collection: Any) -> Any:
    return driver.primary(collection.database[SCHEDULES_COLLECTION])


async def schedule_cursor(collection: Any, key: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = await schedules(collection).find_one({"_id": key})
    return found


async def start_schedule(collection: Any, key: str, slot: datetime, describe: str, now: datetime) -> bool:
    """Create a schedule's cursor at ``slot``; False when another scheduler created it first."""
    try:
        await schedules(collection).insert_one({"_id": key, "last_slot": slot, "schedule": describe, "updated_at": now})
    except DuplicateKeyError:
        return False
    return True


async def advance_schedule(collection: Any, key: str, last: Any, slot: datetime, describe: str, now: datetime) -> bool:
    """Compare-and-set a schedule's cursor from ``last`` to ``slot``."""
    result = await schedules(collection).update_one(
        {"_id": key, "last_slot": last}, {"$set": {"last_slot": slot, "schedule": describe, "updated_at": now}}
    )
    return bool(result.modified_count)


# ------------------------------------------------------------------ sync producers
# ``beanie_tasks.sync`` pushes from code without an event loop through PyMongo's sync
# client. These are its commands; every filter, update and document comes from the same
# builders as the async commands above, through a ``Store`` built on the sync collection.


class SyncStore:
    """The commands a sync producer sends for one task class, over a ``pymongo.MongoClient`` collection."""

    def __init__(self, shape: Store) -> None:
        self.shape = shape
        self.collection = shape.collection

    def ensure_indexes(self) -> None:
        try:
            self.shape.raw.create_indexes(self.shape.index_models())
        except OperationFailure as exc:
            conflict = self.shape.index_conflict(exc)
            if conflict is None:
                raise
            raise conflict from exc

    def measure_clock(self) -> None:
        """Measure the sync client's offset from the server's clock (one ``hello``; none in process)."""
        raw = self.shape.raw
        before = clock.local_now()
        clock.record(raw.database.client, before, driver.server_time_sync(raw), clock.local_now())

    def now(self) -> datetime:
        """The server's time, as a push decides due times by; the offset is measured again once a minute."""
        if clock.is_stale(self.shape.raw):
            self.measure_clock()
        return self.shape.now()

    def insert(self, document: dict[str, Any]) -> None:
        driver.check_document_size(self.shape.raw, document)
        self.collection.insert_one(document)

    def watch_end(self, task_id: Any, max_await: float) -> Any | None:
        """A change stream of the changes that can end ``task_id`` (``ENDING_CHANGES``), for ``wait_sync``."""
        pipeline = [{"$match": {"documentKey._id": task_id}}, *ENDING_CHANGES]
        return driver.open_change_stream_sync(self.shape.raw, pipeline, max_await)

    def find_by_id(self, task_id: Any, projection: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.collection.find_one({"_id": task_id}, projection)
        return found

    def find_dedupe_twin(self, key: str, partition: Any = None) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.collection.find_one(self.shape.dedupe_twin_filter(key, partition))
        return found

    def states_of(self, collection_name: str, ids: Sequence[Any]) -> dict[Any, dict[str, Any]]:
        cursor = self.shape.collection_named(collection_name).find(*states_query(ids))
        return {row["_id"]: row for row in cursor}

    def register_dependent(self, collection_name: str, ids: Sequence[Any]) -> int:
        result = self.shape.collection_named(collection_name).update_many(*self.shape.registration(ids))
        return int(result.matched_count)

    def tell(
        self, dependent_id: Any, dependency_id: Any, fields: Sequence[str], mark: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        """``tell`` for a dependent of this class that a dependency ended before it was registered."""
        snapshot: dict[str, Any] | None = self.collection.find_one_and_update(
            *tell_command(dependent_id, dependency_id, fields, mark),
            projection=DEPENDENT_PROJECTION,
            return_document=ReturnDocument.AFTER,
        )
        if snapshot is None:
            snapshot = self.collection.find_one(dependent_key(dependent_id, None), DEPENDENT_PROJECTION)
        return snapshot

    def release_parked(self, snapshot: Mapping[str, Any], run_at: Any) -> bool:
        return bool(self.collection.update_one(*release_command(snapshot, run_at)).modified_count)

    def fail_parked(self, snapshot: Mapping[str, Any], reason: str, ttl: float | None) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.collection.find_one_and_update(
            *fail_command(snapshot, reason, ttl, self.shape.now()),
            projection=ENDED_PROJECTION,
            return_document=ReturnDocument.AFTER,
        )
        return found


# ------------------------------------------------------------------ the worker registry


def workers(database: Any) -> Any:
    return driver.primary(database[WORKERS_COLLECTION])


async def ensure_worker_index(database: Any) -> None:
    await workers(database).create_indexes(
        [IndexModel([("expires_at", ASCENDING)], name="bt_worker_expiry", expireAfterSeconds=0)]
    )


async def record_worker(database: Any, consumer_id: str, fields: Mapping[str, Any], keep_for: float) -> None:
    """Upsert one worker's registry document; it expires ``keep_for`` seconds after its last refresh."""
    now = clock.now(database[WORKERS_COLLECTION])
    await workers(database).update_one(
        {"_id": consumer_id},
        {"$set": {**fields, "seen_at": now, "expires_at": now + timedelta(seconds=keep_for)}},
        upsert=True,
    )


async def forget_worker(database: Any, consumer_id: str) -> None:
    await workers(database).delete_one({"_id": consumer_id})


async def recent_workers(database: Any, limit: int = 200) -> list[dict[str, Any]]:
    cursor = workers(database).find({}, sort=[("seen_at", DESCENDING)], limit=limit)
    return [row async for row in cursor]


async def schedule_cursors(database: Any, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    cursor = driver.primary(database[SCHEDULES_COLLECTION]).find({"_id": {"$in": list(keys)}})
    return {str(row["_id"]): row async for row in cursor}


# ------------------------------------------------------------------ the registry

_stores: weakref.WeakKeyDictionary[type, Store] = weakref.WeakKeyDictionary()
_collection_owner: dict[tuple[str, str], type] = {}


def register(owner: type, store: Store, *, shares_by_inheritance: bool) -> None:
    """Record ``store`` as the one for ``owner`` (done by ``init_beanie`` through ``custom_init``).

    Two classes may share a collection only through Beanie inheritance: without a
    class field their documents could not be told apart.
    """
    key = (str(store.raw.database.name), str(store.raw.name))
    other = _collection_owner.get(key)
    if not shares_by_inheritance:
        if other is not None and other is not owner and other.__name__ != owner.__name__:
            raise NotRegistered(
                f"{owner.__name__} and {other.__name__} both use collection {store.raw.name!r}; classes share a "
                "collection only through Beanie inheritance (Settings.is_root = True on their common parent)"
            )
        _collection_owner[key] = owner
    _stores[owner] = store


def of(owner: type) -> Store:
    """The store of a registered class; a class ``init_beanie`` never saw raises ``NotRegistered``."""
    found = _stores.get(owner)
    if found is None:
        raise NotRegistered(
            f"{owner.__name__} was never registered: pass it to init_beanie(document_models=[..., {owner.__name__}]) "
            "in this process before pushing, claiming or running it"
        )
    return found


def is_registered(owner: type) -> bool:
    return owner in _stores


def stores_in(collection_name: str, database: Any = None) -> list[Store]:
    """The registered stores on a collection; with ``database``, only those in that database, the
    ones on its very client first (a process can hold classes registered on other clients)."""
    found = [s for s in _stores.values() if s.raw.name == collection_name]
    if database is None:
        return found
    here = [s for s in found if s.raw.database.name == database.name]
    return sorted(here, key=lambda s: s.raw.database.client is not database.client)


def owner_of(scope_store: Store, class_id: Any) -> Store:
    """The registered store of exactly the class ``class_id`` names in ``scope_store``'s collection (one on
    the same client first): whose settings apply to its documents. ``scope_store`` when none is registered."""
    if scope_store.class_field is None:
        return scope_store
    raw = scope_store.raw
    for candidate in stores_in(str(raw.name), raw.database):
        ids = candidate.class_ids()
        if candidate.class_field == scope_store.class_field and ids and ids[0] == class_id:
            return candidate
    return scope_store


_sync_stores: weakref.WeakKeyDictionary[type, SyncStore] = weakref.WeakKeyDictionary()


def register_sync(owner: type, sync_store: SyncStore) -> None:
    """Record the sync producer's store of ``owner`` (done by ``beanie_tasks.sync.init``)."""
    _sync_stores[owner] = sync_store


def sync_of(owner: type) -> SyncStore:
    """The sync store of a class passed to ``beanie_tasks.sync.init``; raises ``NotConfigured`` otherwise."""
    found = _sync_stores.get(owner)
    if found is not None:
        return found
    if not _sync_stores:
        raise NotConfigured(
            f"{owner.__name__}.push_sync() needs beanie_tasks.sync.init(uri, document_models=[...]) "
            "to be called once in this process first"
        )
    raise NotConfigured(
        f"{owner.__name__} is not in the document_models given to beanie_tasks.sync.init(); add it there"
    )


def forget_sync() -> None:
    """Drop every sync store (``beanie_tasks.sync.close``)."""
    _sync_stores.clear()
