"""Dependency links between tasks: declaring them, readiness kept on the dependent, failure propagation.

A dependent task is declared with Beanie ``Link`` fields marked with a
``dependency_type``. Its readiness lives on its own document, so claiming never
looks at another document: while it waits it is parked at ``run_at = FAR_FUTURE``
and it is released to the ``run_at`` it was pushed with once every link field is met.

Bookkeeping, kept in document fields outside the pydantic model (like ``dedupe_slot``):

* on a dependent that waits: ``dep_blocked: true``, ``dep_run_at`` (the requested
  ``run_at``) and ``dep_links``: per field ``{kind, on_failure, c, wait, ok, bad}``,
  where ``wait`` holds the ids of links that have not ended, ``ok`` the finished ones
  and ``bad`` ``{id, c, state, error}`` of the failed, cancelled or deleted ones;
* on a dependent failed because of its links: ``dep_failed: true`` (``requeue_failed``
  leaves it FAILED: requeued, it would run without its links);
* on a dependency: ``dependents`` (``{c, id, f}``: collection, id and field names of
  each dependent) and ``dependents_pending: true`` until it ended and every dependent
  was told. A task nothing depends on carries neither, and ending it costs one command.

Telling a dependent is ``$pull`` from ``wait`` plus ``$addToSet`` to ``ok`` or ``bad``:
idempotent, so a repeat (a sweep after a crash, a race with a push) changes nothing.
The verdict computed from the document it returns is final once it says ready or
failed (``wait`` only shrinks, ``ok`` and ``bad`` only grow), so releasing or failing
the dependent is one guarded write that any number of callers may repeat.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ForwardRef, get_args, get_origin

from beanie import Document, Link
from bson import DBRef
from pydantic import Field, JsonValue
from pydantic.fields import FieldInfo
from pymongo import ASCENDING, IndexModel, ReturnDocument
from pymongo.errors import PyMongoError

from beanie_tasks import driver
from beanie_tasks.errors import PushError
from beanie_tasks.states import IN_FLIGHT_STATES, TERMINAL_STATES, DependencyType, State

if TYPE_CHECKING:
    from beanie_tasks.task import Task

log = logging.getLogger("beanie_tasks")

DELETED = "DELETED"  # the pseudo-state of a dependency that no longer exists
MAX_REASON = 300
RECONCILE_EVERY = 60.0  # seconds between two checks of a class's parked tasks, per process
RECONCILE_BATCH = 500
# Terminal writes ask for the document AFTER the write: the dependents are the same
# either way, and SecantusDB can return a stale BEFORE image under concurrent writes.
ENDED_PROJECTION = {"dependents": 1, "dependents_pending": 1}
_IN_FLIGHT = sorted(s.value for s in IN_FLIGHT_STATES)
_TERMINAL = sorted(s.value for s in TERMINAL_STATES)


class OnFailure(str, Enum):
    """What a link field does when its dependencies fail, are cancelled or are deleted."""

    FAIL = "FAIL"
    """The dependent ends FAILED (DIRECT/ALL_OF: any link failed; ANY_OF: every link failed)."""
    RUN = "RUN"
    """The field counts as met once each of its links has ended, however it ended."""


@dataclass(frozen=True)
class LinkField:
    """One declared dependency field of a task class."""

    name: str
    kind: DependencyType
    on_failure: OnFailure


def depends_on(
    kind: DependencyType | str,
    *,
    on_failure: OnFailure | str = OnFailure.FAIL,
    **field_kwargs: Any,
) -> Any:
    """A pydantic ``Field`` marking a ``Link`` field as a dependency.

    Same as ``Field(dependency_type=kind)`` without pydantic's warning about extra
    ``Field`` keywords; other keywords (``default``, ``default_factory``, ...) pass through.
    """
    extra: dict[str, JsonValue] = {
        "dependency_type": DependencyType(kind).value,
        "on_failure": OnFailure(on_failure).value,
    }
    return Field(json_schema_extra=extra, **field_kwargs)


# ------------------------------------------------------------------ declarations

_declared: weakref.WeakKeyDictionary[type, tuple[LinkField, ...]] = weakref.WeakKeyDictionary()
_declaring: weakref.WeakSet[type] = weakref.WeakSet()
_classes_by_collection: dict[str, type[Task]] = {}


def _marking(info: FieldInfo) -> tuple[Any, Any] | None:
    extra = info.json_schema_extra
    if not isinstance(extra, dict) or "dependency_type" not in extra:
        return None
    return extra["dependency_type"], extra.get("on_failure", OnFailure.FAIL)


def declared_links(task_class: type) -> tuple[LinkField, ...]:
    """The dependency fields of ``task_class``; raises TypeError on a bad declaration."""
    known = _declared.get(task_class)
    if known is not None:
        return known
    found = []
    for name, info in getattr(task_class, "model_fields", {}).items():
        marking = _marking(info)
        if marking is None:
            continue
        kind, policy = marking
        try:
            found.append(LinkField(name, DependencyType(kind), OnFailure(policy)))
        except ValueError as exc:
            raise TypeError(f"{task_class.__name__}.{name}: {exc}") from exc
    links = tuple(found)
    _declared[task_class] = links
    if links:
        _declaring.add(task_class)
        _target_cache.clear()
    return links


def _link_targets(annotation: Any) -> Iterable[Any]:
    """The classes ``Link[...]`` points to anywhere inside ``annotation``."""
    if get_origin(annotation) is Link:
        yield from get_args(annotation)[:1]
        return
    for argument in get_args(annotation):
        yield from _link_targets(argument)


_target_cache: dict[type, bool] = {}


def is_link_target(task_class: type) -> bool:
    """Whether some declared dependency field may point to ``task_class`` (unresolved names count)."""
    known = _target_cache.get(task_class)
    if known is None:
        known = _target_cache[task_class] = _find_link_target(task_class)
    return known


def _find_link_target(task_class: type) -> bool:
    for declaring in list(_declaring):
        fields = getattr(declaring, "model_fields", {})
        for link in declared_links(declaring):
            info = fields.get(link.name)
            targets = list(_link_targets(info.annotation)) if info is not None else []
            if not targets:
                return True
            for target in targets:
                if not isinstance(target, type) or isinstance(target, ForwardRef):
                    return True
                if issubclass(task_class, target) or issubclass(target, task_class):
                    return True
    return False


def takes_part(task_class: type) -> bool:
    """Whether dependency bookkeeping can concern ``task_class`` at all."""
    return bool(declared_links(task_class)) or is_link_target(task_class)


def ends_a_link_target(task_class: type, update: Mapping[str, Any]) -> bool:
    """Whether this transition ends a task that dependents may be registered on."""
    return update.get("$set", {}).get("state") in _TERMINAL and is_link_target(task_class)


def _collection_name(collection: Any) -> str:
    return str(collection.name)


async def ensure_indexes(task_class: type[Task]) -> None:
    """Partial indexes that keep the repair sweeps cheap; they only hold documents in the graph."""
    collection = task_class.collection()
    _classes_by_collection[_collection_name(collection)] = task_class
    declared_links(task_class)
    _target_cache.clear()  # init_beanie resolves forward references: look again
    mock = driver.is_mock(collection)

    def only_flagged(name: str) -> dict[str, Any]:
        return {"sparse": True} if mock else {"partialFilterExpression": {name: True}}

    await collection.create_indexes(
        [
            IndexModel([("dependents_pending", ASCENDING)], name="bt_dependents", **only_flagged("dependents_pending")),
            IndexModel([("dep_blocked", ASCENDING)], name="bt_blocked", **only_flagged("dep_blocked")),
        ]
    )


# ------------------------------------------------------------------ readiness


@dataclass(frozen=True)
class Verdict:
    ready: bool
    failure: str | None = None


WAITING = Verdict(ready=False)
READY = Verdict(ready=True)


def _describe(collection_name: str, mark: Mapping[str, Any]) -> str:
    task_class = _classes_by_collection.get(collection_name)
    name = task_class.__name__ if task_class is not None else collection_name
    state = mark.get("state")
    text = (
        f"{name} {mark.get('id')} was deleted before it ended"
        if state == DELETED
        else f"{name} {mark.get('id')} ended {state}"
    )
    error = mark.get("error")
    if error:
        text += f" ({error})"
    return text


def verdict(links: Mapping[str, Mapping[str, Any]]) -> Verdict:
    """Ready, failed (with the reason) or still waiting, from a dependent's ``dep_links``."""
    waiting = False
    for name, link in links.items():
        kind = DependencyType(link["kind"])
        policy = OnFailure(link["on_failure"])
        wait, ok, bad = link.get("wait", []), link.get("ok", []), link.get("bad", [])
        if kind is DependencyType.ANY_OF:
            if ok or not (wait or bad):
                continue
            if wait:
                waiting = True
                continue
            if policy is OnFailure.FAIL:
                cause = _describe(link["c"], bad[-1])
                return Verdict(False, f"every dependency in field {name!r} (ANY_OF) failed; the last: {cause}")
            continue
        if bad and policy is OnFailure.FAIL:
            return Verdict(False, f"dependency in field {name!r} ({kind.value}) failed: {_describe(link['c'], bad[0])}")
        if wait:
            waiting = True
    return WAITING if waiting else READY


def _short(error: Any) -> str | None:
    if not error:
        return None
    text = str(error)
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


@dataclass
class Ended:
    """A task that reached a terminal state (or vanished), with the dependents to tell."""

    collection: Any
    id: Any
    state: str
    error: str | None = None
    dependents: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state == State.FINISHED.value

    def mark(self) -> dict[str, Any]:
        return {"id": self.id, "c": _collection_name(self.collection), "state": self.state, "error": _short(self.error)}


async def _tell(dependent_collection: Any, dependent_id: Any, fields: list[str], ended: Ended) -> Ended | None:
    """Record on one dependent that ``ended`` ended; release or fail it when that decides it.

    Returns the dependent itself when it was failed and has dependents of its own.
    """
    target = "ok" if ended.ok else "bad"
    value = ended.id if ended.ok else ended.mark()
    update = {
        "$pull": {f"dep_links.{name}.wait": ended.id for name in fields},
        "$addToSet": {f"dep_links.{name}.{target}": value for name in fields},
    }
    snapshot = await dependent_collection.find_one_and_update(
        {"_id": dependent_id},
        update,
        projection={"state": 1, "dep_blocked": 1, "dep_links": 1, "dep_run_at": 1},
        return_document=ReturnDocument.AFTER,
    )
    if snapshot is None:
        return None  # the dependent itself was deleted: nothing waits any more
    return await _decide(dependent_collection, snapshot)


async def _decide(collection: Any, snapshot: Mapping[str, Any]) -> Ended | None:
    """Release or fail a parked dependent whose snapshot decides it (repeatable)."""
    if not snapshot.get("dep_blocked") or snapshot.get("state") != State.CREATED.value:
        return None
    outcome = verdict(snapshot.get("dep_links") or {})
    guard = {"_id": snapshot["_id"], "state": State.CREATED.value, "dep_blocked": True}
    if outcome.ready:
        await collection.update_one(guard, {"$set": {"run_at": snapshot["dep_run_at"]}, "$unset": {"dep_blocked": ""}})
        return None
    if outcome.failure is None:
        return None
    fields = _terminal_failure(collection, outcome.failure) | {"dep_failed": True}
    failed = await collection.find_one_and_update(
        guard,
        {"$set": fields, "$unset": {"dep_blocked": "", "dedupe_slot": ""}},
        projection=ENDED_PROJECTION,
        return_document=ReturnDocument.AFTER,
    )
    if failed is None:
        return None
    log.info("%s %s failed: %s", _collection_name(collection), snapshot["_id"], outcome.failure)
    if not failed.get("dependents_pending"):
        return None
    return Ended(collection, snapshot["_id"], State.FAILED.value, outcome.failure, list(failed.get("dependents") or []))


def _terminal_failure(collection: Any, reason: str) -> dict[str, Any]:
    from beanie_tasks.task import utcnow

    task_class = _classes_by_collection.get(_collection_name(collection))
    now = utcnow()
    if task_class is not None:
        fields = task_class._terminal_fields(State.FAILED, now)
    else:
        fields = {"state": State.FAILED.value, "finished_at": now, "expires_at": None, "lease_expires_at": None}
    return fields | {"error": reason}


async def _propagate(first: Iterable[Ended]) -> None:
    """Tell every dependent of each ended task, following failures down the graph."""
    work = list(first)
    while work:
        ended = work.pop()
        database = ended.collection.database
        for entry in ended.dependents:
            failed = await _tell(database[entry["c"]], entry["id"], list(entry["f"]), ended)
            if failed is not None:
                work.append(failed)
        if ended.state != DELETED:
            await ended.collection.update_one(
                {"_id": ended.id, "state": ended.state, "dependents_pending": True},
                {"$unset": {"dependents_pending": ""}},
            )


async def after_terminal(task_class: type[Task], document: Mapping[str, Any] | None, fields: Mapping[str, Any]) -> None:
    """Called with what a terminal transition returned: free unless the task has dependents.

    A failure here is logged, not raised: the transition itself is done, and the sweep
    in ``recover_expired`` tells the dependents later.
    """
    if not document or not document.get("dependents_pending"):
        return
    ended = Ended(task_class.collection(), document["_id"], str(fields["state"]), fields.get("error"))
    ended.dependents = list(document.get("dependents") or [])
    try:
        await _propagate([ended])
    except PyMongoError as exc:
        log.warning(
            "%s %s: could not tell its dependents yet (%s); the recovery sweep will", task_class.__name__, ended.id, exc
        )


async def after_terminal_by_id(task_class: type[Task], task_id: Any) -> None:
    """Like ``after_terminal`` for a transition that did not return the document."""
    if not takes_part(task_class):
        return
    document = await task_class.collection().find_one(
        {"_id": task_id, "dependents_pending": True, "state": {"$in": _TERMINAL}},
        {**ENDED_PROJECTION, "state": 1, "error": 1},
    )
    if document is not None:
        await after_terminal(task_class, document, document)


async def after_terminal_many(task_class: type[Task], task_ids: Iterable[Any]) -> None:
    """For bulk terminal writes (``update_many``): tell the dependents of those that have any.

    One ``find`` for a class that links can point to; no command at all otherwise.
    """
    if not is_link_target(task_class):
        return
    ids = list(task_ids)
    if not ids:
        return
    rows = task_class.collection().find(
        {"_id": {"$in": ids}, "dependents_pending": True, "state": {"$in": _TERMINAL}},
        {**ENDED_PROJECTION, "state": 1, "error": 1},
    )
    async for row in rows:
        await after_terminal(task_class, row, row)


# ------------------------------------------------------------------ pushing


def require_pushed_links(task: Task) -> None:
    """A dependency must be pushed before its dependent: its id is what the link stores."""
    for link in declared_links(type(task)):
        value = getattr(task, link.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, Document) and item.id is None:
                owner, kind = type(task).__name__, type(item).__name__
                raise PushError(f"{owner}.{link.name} links a {kind} that was never pushed; push it first")


def _references(value: Any, owner: str, name: str) -> list[DBRef]:
    if value is None:
        return []
    if isinstance(value, DBRef):
        return [value]
    if isinstance(value, (list, tuple)):
        return [ref for item in value for ref in _references(item, owner, name)]
    raise PushError(f"{owner}.{name} is a dependency field but holds {type(value).__name__}, not a Link")


@dataclass
class PushPlan:
    """What a push of a dependent still has to do after its insert."""

    task_class: type[Task]
    links: dict[str, dict[str, Any]]
    pending: dict[tuple[str, Any], list[str]]
    outcome: Verdict

    async def register(self, task: Task) -> None:
        """Tell each pending dependency about the new dependent; handle those that ended meanwhile.

        A dependency registered while in flight will tell the dependent when it ends (its
        terminal write returns ``dependents``); one that already ended is applied here.
        """
        if self.outcome is not WAITING:
            return
        collection = self.task_class.collection()
        database = collection.database
        own = _collection_name(collection)
        decided: list[Ended] = []
        touched = False
        for (name, dependency_id), fields in self.pending.items():
            entry = {"c": own, "id": task.id, "f": sorted(fields)}
            ended = await _register(database[name], dependency_id, entry)
            if ended is None:
                continue
            touched = True
            failed = await _tell(collection, task.id, sorted(fields), ended)
            if failed is not None:
                decided.append(failed)
        if decided:
            await _propagate(decided)
        if touched:
            current = await collection.find_one({"_id": task.id}, {"state": 1, "run_at": 1, "error": 1})
            if current is not None:
                task.state = State(current["state"])
                task.run_at = current["run_at"]
                task.error = current.get("error")


async def _register(collection: Any, dependency_id: Any, entry: dict[str, Any]) -> Ended | None:
    """Add ``entry`` to an in-flight dependency's dependents; else return how it ended."""
    registered = await collection.find_one_and_update(
        {"_id": dependency_id, "state": {"$in": _IN_FLIGHT}},
        {"$addToSet": {"dependents": entry}, "$set": {"dependents_pending": True}},
        projection={"_id": 1},
    )
    if registered is not None:
        return None
    current = await collection.find_one({"_id": dependency_id}, {"state": 1, "error": 1})
    if current is None:
        return Ended(collection, dependency_id, DELETED)
    if current.get("state") in _IN_FLIGHT:  # requeued between the two reads: try again
        return await _register(collection, dependency_id, entry)
    return Ended(collection, dependency_id, str(current.get("state")), current.get("error"))


async def prepare_push(task: Task, document: dict[str, Any]) -> PushPlan | None:
    """Read the linked tasks' states and set the new document's readiness; None without links.

    A link to a task that does not exist (never pushed, or deleted) raises PushError
    before anything is written. A dependent that is not ready yet is parked.
    """
    task_class = type(task)
    declared = declared_links(task_class)
    if not declared:
        return None
    owner = task_class.__name__
    links: dict[str, dict[str, Any]] = {}
    wanted: dict[str, set[Any]] = {}
    for link in declared:
        references = _references(document.get(link.name), owner, link.name)
        names = {ref.collection for ref in references}
        if len(names) > 1:
            raise PushError(
                f"{owner}.{link.name} links tasks in several collections ({sorted(names)}); use one field per class"
            )
        name = names.pop() if names else ""
        ids = list(dict.fromkeys(ref.id for ref in references))
        links[link.name] = {
            "kind": link.kind.value,
            "on_failure": link.on_failure.value,
            "c": name,
            "wait": ids,
            "ok": [],
            "bad": [],
        }
        if ids:
            wanted.setdefault(name, set()).update(ids)
    database = task_class.collection().database
    states: dict[tuple[str, Any], Mapping[str, Any]] = {}
    for name, wanted_ids in wanted.items():
        async for row in database[name].find({"_id": {"$in": list(wanted_ids)}}, {"state": 1, "error": 1}):
            states[(name, row["_id"])] = row
    pending: dict[tuple[str, Any], list[str]] = {}
    for field_name, link_doc in links.items():
        name = link_doc["c"]
        for dependency_id in list(link_doc["wait"]):
            row = states.get((name, dependency_id))
            if row is None:
                raise PushError(
                    f"{owner}.{field_name} links {name} {dependency_id}, which does not exist (not pushed, or deleted)"
                )
            if "state" not in row:
                raise PushError(f"{owner}.{field_name} links {name} {dependency_id}, which is not a task")
            state = row["state"]
            if state in _IN_FLIGHT:
                pending.setdefault((name, dependency_id), []).append(field_name)
                continue
            link_doc["wait"].remove(dependency_id)
            if state == State.FINISHED.value:
                link_doc["ok"].append(dependency_id)
            else:
                ended = Ended(database[name], dependency_id, str(state), row.get("error"))
                link_doc["bad"].append(ended.mark())
    outcome = verdict(links)
    document["dep_links"] = links
    if outcome.failure is not None:
        from beanie_tasks.task import utcnow

        document.update(
            task_class._terminal_fields(State.FAILED, utcnow()) | {"error": outcome.failure, "dep_failed": True}
        )
        document.pop("dedupe_slot", None)
        task.state, task.error = State.FAILED, outcome.failure
    elif not outcome.ready:
        from beanie_tasks.task import FAR_FUTURE

        document["dep_run_at"] = document["run_at"]
        document["run_at"] = FAR_FUTURE
        document["dep_blocked"] = True
        task.run_at = FAR_FUTURE
    return PushPlan(task_class, links, pending, outcome)


# ------------------------------------------------------------------ repair


_last_reconcile: dict[tuple[str, str], float] = {}


async def sweep(task_class: type[Task], *, reconcile: bool | None = None) -> int:
    """Repair what a crash or a deletion can leave behind; returns how many tasks it touched.

    1. Tasks of this class that ended while dependents were still to be told
       (the process died between the two): tell them now.
    2. ``reconcile`` (by default at most every ``RECONCILE_EVERY`` seconds): check
       every parked task of this class against its pending links; a link whose task
       was deleted fails the field (``on_failure`` applies), one that ended is applied,
       one that never heard of its dependent is told again.

    Costs nothing for a class that has no dependency fields and that no field links to.
    """
    if not takes_part(task_class):
        return 0
    collection = task_class.collection()
    touched = 0
    rows = [
        row
        async for row in collection.find(
            {"dependents_pending": True, "state": {"$in": _TERMINAL}}, {**ENDED_PROJECTION, "state": 1, "error": 1}
        ).limit(RECONCILE_BATCH)
    ]
    for row in rows:
        await after_terminal(task_class, row, row)
        touched += 1
    if not declared_links(task_class):
        return touched
    key = (str(collection.database.name), _collection_name(collection))
    now = time.monotonic()
    if reconcile is None:
        reconcile = now - _last_reconcile.get(key, float("-inf")) >= RECONCILE_EVERY
    if reconcile:
        _last_reconcile[key] = now
        touched += await _reconcile(collection)
    return touched


async def check_dependencies(task_class: type[Task]) -> int:
    """Run the full repair sweep now (see ``sweep``); returns how many tasks it touched."""
    return await sweep(task_class, reconcile=True)


async def _reconcile(collection: Any) -> int:
    database = collection.database
    own = _collection_name(collection)
    parked = [
        row
        async for row in collection.find({"dep_blocked": True, "state": State.CREATED.value}, {"dep_links": 1}).limit(
            RECONCILE_BATCH
        )
    ]
    waits: dict[Any, dict[tuple[str, Any], list[str]]] = {}
    wanted: dict[str, set[Any]] = {}
    for row in parked:
        edges: dict[tuple[str, Any], list[str]] = {}
        for field_name, link in (row.get("dep_links") or {}).items():
            for dependency_id in link.get("wait", []):
                edges.setdefault((link["c"], dependency_id), []).append(field_name)
                wanted.setdefault(link["c"], set()).add(dependency_id)
        waits[row["_id"]] = edges
    found: dict[tuple[str, Any], Mapping[str, Any]] = {}
    for name, ids in wanted.items():
        async for row in database[name].find({"_id": {"$in": list(ids)}}, {"state": 1, "error": 1, "dependents": 1}):
            found[(name, row["_id"])] = row
    touched = 0
    decided: list[Ended] = []
    for dependent_id, edges in waits.items():
        for (name, dependency_id), fields in edges.items():
            entry = {"c": own, "id": dependent_id, "f": sorted(fields)}
            row = found.get((name, dependency_id))
            if row is not None and row.get("state") in _IN_FLIGHT:
                if any(d.get("c") == own and d.get("id") == dependent_id for d in row.get("dependents") or []):
                    continue
                ended = await _register(database[name], dependency_id, entry)
                if ended is None:
                    touched += 1
                    continue
            elif row is None:
                ended = Ended(database[name], dependency_id, DELETED)
                log.warning("%s %s: its dependency %s %s was deleted", own, dependent_id, name, dependency_id)
            else:
                ended = Ended(database[name], dependency_id, str(row.get("state")), row.get("error"))
            touched += 1
            failed = await _tell(collection, dependent_id, sorted(fields), ended)
            if failed is not None:
                decided.append(failed)
    if decided:
        await _propagate(decided)
    return touched
