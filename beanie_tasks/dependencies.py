"""Dependency links between tasks: declaring them, readiness kept on the dependent, failure propagation.

A dependent task is declared with Beanie ``Link`` fields marked with a
``dependency_type``. Its readiness lives on its own document, so claiming never
looks at another document: while it waits it is parked at ``run_at = FAR_FUTURE``
and it is released to the ``run_at`` it was pushed with once every link field is met.
The stored fields are listed in ``store``.

Notification is driven by what is stored, never by what a process imported: every
terminal write returns the task's ``dependents_pending`` flag, and the process that
ended the task tells its dependents, found through the index on their ``dep_wait``,
whatever their classes. Telling a dependent removes the dependency from its
``dep_wait`` and counts the outcome in the same write, so a repeat (a sweep after a
crash, a race with a push) changes nothing. The verdict computed from the counters is
final once it says ready or failed, so releasing or failing the dependent is one
guarded write that any number of callers may repeat. Dependents are told a page at a
time: the page's tells in one bulk write, their counters read back after it, the
releases in one more bulk write, so a fan-out costs commands per page, not per dependent.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from beanie import Document
from bson import DBRef
from pydantic import Field, JsonValue
from pydantic.fields import FieldInfo
from pymongo.errors import DuplicateKeyError, InvalidName, PyMongoError

from beanie_tasks import clock, store
from beanie_tasks.errors import PushError
from beanie_tasks.redact import get_logger
from beanie_tasks.states import DependencyType, State, state_value
from beanie_tasks.store import Ended, Store, SyncStore

log = get_logger("beanie_tasks")

DELETED = "DELETED"  # the pseudo-state of a dependency that no longer exists
MAX_REASON = 300
# A dependent may wait for at most this many tasks: each one's end rewrites the
# dependent's document, so a larger fan-in would cost more than linear time.
MAX_LINKS_PER_TASK = 1000
RECONCILE_EVERY = 60.0  # seconds between two checks of a class's parked tasks, per process
RECONCILE_BATCH = 500
# What reading a document's dependency bookkeeping raises when another client wrote garbage there.
BAD_BOOKKEEPING = (KeyError, TypeError, ValueError, AttributeError, IndexError, InvalidName)


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
    return links


# ------------------------------------------------------------------ readiness


@dataclass(frozen=True)
class Verdict:
    ready: bool
    failure: str | None = None


WAITING = Verdict(ready=False)
READY = Verdict(ready=True)


def _class_name(collection_name: str) -> str:
    stores = store.stores_in(collection_name)
    return stores[0].name if len(stores) == 1 else collection_name


def describe(mark: Mapping[str, Any]) -> str:
    """One line for a dependency that ended badly, from the mark its dependent keeps."""
    name = mark.get("n") or mark.get("c")
    state = mark.get("state")
    if state == DELETED:
        text = f"{name} {mark.get('id')} was deleted before it ended"
    else:
        text = f"{name} {mark.get('id')} ended {state}"
    error = mark.get("error")
    if error:
        text += f" ({error})"
    return text


def verdict(links: Mapping[str, Any]) -> Verdict:
    """Ready, failed (with the reason) or still waiting, from a dependent's ``dep_links`` counters.

    Raises ``ValueError`` (or ``TypeError``) on bookkeeping that is not of that shape.
    """
    if not isinstance(links, Mapping):
        raise TypeError(f"dep_links is a {type(links).__name__}, not a document")
    waiting = False
    for name, link in links.items():
        if not isinstance(link, Mapping):
            raise TypeError(f"dep_links.{name} is a {type(link).__name__}, not a document")
        kind = DependencyType(link["kind"])
        policy = OnFailure(link["on_failure"])
        total, ok, bad = int(link.get("n", 0)), int(link.get("ok", 0)), int(link.get("bad", 0))
        pending = total - ok - bad
        cause = link.get("cause") or {}
        if kind is DependencyType.ANY_OF:
            if ok or total == 0:
                continue
            if pending > 0:
                waiting = True
                continue
            if policy is OnFailure.FAIL:
                return Verdict(
                    False, f"every dependency in field {name!r} (ANY_OF) failed; the last: {describe(cause)}"
                )
            continue
        if bad and policy is OnFailure.FAIL:
            return Verdict(False, f"dependency in field {name!r} ({kind.value}) failed: {describe(cause)}")
        if pending > 0:
            waiting = True
    return WAITING if waiting else READY


def _short(error: Any) -> str | None:
    if not error:
        return None
    text = str(error)
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def dependents_in(returned: Mapping[str, Any]) -> tuple[str, ...]:
    """The collections a task's dependents live in, from its stored ``dependents_in``.

    Raises ``TypeError`` on anything but a list of names: bookkeeping nobody can trust.
    """
    names = returned.get("dependents_in") or []
    if not isinstance(names, list) or not all(is_collection_name(name) for name in names):
        raise TypeError(f"dependents_in is {str(names)[:100]!r}, not a list of collection names")
    return tuple(names)


def is_collection_name(name: Any) -> bool:
    """Whether ``name`` is a name MongoDB accepts for a collection (what a stored reference must be)."""
    return (
        isinstance(name, str)
        and bool(name)
        and "$" not in name
        and "\x00" not in name
        and not name.startswith(".")
        and not name.endswith(".")
    )


def mark_of(ended: Ended) -> dict[str, Any] | None:
    """What a dependent keeps of a dependency that ended badly (None: it finished)."""
    if ended.state == State.FINISHED.value:
        return None
    name = str(ended.collection.name)
    return {"id": ended.id, "c": name, "n": _class_name(name), "state": ended.state, "error": _short(ended.error)}


# ------------------------------------------------------------------ telling dependents


def decision(snapshot: Mapping[str, Any]) -> Verdict | None:
    """The verdict on a dependent that was just told something (None: it no longer waits)."""
    if not snapshot.get("dep_blocked") or snapshot.get("state") != State.CREATED.value:
        return None
    return verdict(snapshot.get("dep_links") or {})


async def _decide(collection: Any, snapshot: Mapping[str, Any]) -> Ended | None:
    """Release or fail a parked dependent whose counters decide it (repeatable).

    Returns the dependent itself when it was failed and has dependents of its own.
    """
    outcome = decision(snapshot)
    if outcome is None:
        return None
    if outcome.ready:
        await store.release_parked(collection, snapshot, snapshot.get("dep_run_at") or clock.now(collection))
        return None
    if outcome.failure is None:
        return None
    return await _fail_dependent(collection, snapshot, outcome.failure)


async def _fail_dependent(collection: Any, snapshot: Mapping[str, Any], failure: str) -> Ended | None:
    """Fail a parked dependent whose links failed; returns it when it has dependents of its own to tell."""
    failed = await store.fail_parked(collection, snapshot, failure, snapshot.get("dep_ttl"))
    if failed is None:
        return None
    log.info("%s %s failed: %s", _class_name(str(collection.name)), snapshot["_id"], failure)
    if not failed.get("dependents_pending"):
        return None
    return Ended(collection, snapshot["_id"], State.FAILED.value, failure, tuple(failed.get("dependents_in") or ()))


async def _tell_one(
    collection: Any, dependent_id: Any, fields: Sequence[str], ended: Ended, found: Mapping[str, Any] | None = None
) -> Ended | None:
    snapshot = await store.tell(collection, dependent_id, ended.id, fields, mark_of(ended), found)
    if snapshot is None:
        return None  # the dependent itself was deleted: nothing waits any more
    return await _decide(collection, snapshot)


async def _set_aside_dependent(collection: Any, row: Mapping[str, Any], exc: Exception) -> None:
    reason = f"dependency bookkeeping of this task is malformed ({type(exc).__name__}: {exc}); it was set aside"
    log.error("%s %s: %s", collection.name, row["_id"], reason)
    await store.fail_parked(collection, row, reason[:MAX_REASON], None)


async def _tell_page(
    collection: Any, ended: Ended, page: Sequence[Mapping[str, Any]]
) -> tuple[list[Ended], PyMongoError | None]:
    """Tell one page of waiting dependents that ``ended`` ended, and release or fail those it decides.

    A fixed number of commands per page, whatever its size: one bulk write of the tells,
    one read of the counters they leave, one bulk write of the releases; only a dependent
    that fails costs a write of its own (it may have dependents to tell in turn).
    Returns the dependents that failed and have dependents of their own, and the error of
    a tell the server refused (the others are told all the same).
    """
    told: list[tuple[Mapping[str, Any], list[str]]] = []
    for row in page:
        try:
            entry = (row.get("dep_wait") or [{}])[0]
            told.append((row, [str(f) for f in entry.get("f", [])]))
        except BAD_BOOKKEEPING as exc:
            await _set_aside_dependent(collection, row, exc)
    if not told:
        return [], None
    snapshots, refused = await store.tell_page(collection, ended.id, told, mark_of(ended))
    cascade: list[Ended] = []
    ready: list[tuple[Mapping[str, Any], Any]] = []
    now = None
    for snapshot in snapshots:
        try:
            outcome = decision(snapshot)
        except BAD_BOOKKEEPING as exc:
            await _set_aside_dependent(collection, snapshot, exc)
            continue
        if outcome is None:
            continue
        if outcome.ready:
            run_at = snapshot.get("dep_run_at")
            if run_at is None:
                now = now or clock.now(collection)
                run_at = now
            ready.append((snapshot, run_at))
        elif outcome.failure is not None:
            failed = await _fail_dependent(collection, snapshot, outcome.failure)
            if failed is not None:
                cascade.append(failed)
    if ready:
        await store.release_page(collection, ready)
    return cascade, refused


async def _tell_all(ended: Ended, ttl: float | None) -> tuple[list[Ended], PyMongoError | None]:
    """Tell every dependent of ``ended``, page by page; returns those that failed because of it.

    A tell the server refused is returned after every other dependent was told, and the
    task keeps its ``dependents_pending`` flag, so its repair sweep tries again.
    """
    if ttl is not None:
        await store.hold_expiry(ended)
    cascade: list[Ended] = []
    refused: PyMongoError | None = None
    database = ended.collection.database
    for name in ended.dependents_in:
        if not isinstance(name, str):
            continue
        collection = database[name]
        after = None
        while True:
            page = await store.waiting_dependents(collection, ended.id, after, store.PAGE)
            if page:
                after = page[-1]["_id"]
                failed, error = await _tell_page(collection, ended, page)
                cascade += failed
                refused = refused or error
            if len(page) < store.PAGE:
                break
    if ended.state != DELETED and refused is None:
        await store.dependents_told(ended, ttl)
    return cascade, refused


async def propagate(first: Ended, ttl: float | None) -> None:
    """Tell the dependents of ``first``, following failures down the graph.

    Raises the first tell the server refused, once every other dependent was told.
    """
    work: list[tuple[Ended, float | None]] = [(first, ttl)]
    refused: PyMongoError | None = None
    while work:
        ended, ended_ttl = work.pop()
        cascade, error = await _tell_all(ended, ended_ttl)
        work += [(failed, None) for failed in cascade]
        refused = refused or error
    if refused is not None:
        raise refused


async def after_terminal(
    owner: Store, task_id: Any, state: str, error: str | None, returned: Mapping[str, Any] | None
) -> None:
    """Called with what a terminal write returned: free unless dependents wait for the task.

    A failure here is logged, not raised: the transition itself is done, and the repair
    sweep of the task's class tells the dependents later.
    """
    if not returned or not returned.get("dependents_pending"):
        return
    try:
        ended = Ended(owner.raw, task_id, state, error, dependents_in(returned))
        await propagate(ended, owner.options.ttl)
    except TypeError as exc:
        log.error("%s %s: %s; its dependents are left to their own repair sweep", owner.name, task_id, exc)
    except PyMongoError as exc:
        log.warning("%s %s: could not tell its dependents yet (%s); the repair sweep will", owner.name, task_id, exc)


# ------------------------------------------------------------------ pushing


def require_pushed_links(owner: str, links: Sequence[LinkField], values: Mapping[str, Any]) -> None:
    """A dependency must be pushed before its dependent: its id is what the link stores."""
    for link in links:
        value = values.get(link.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, Document) and item.id is None:
                raise PushError(
                    f"{owner}.{link.name} links a {type(item).__name__} that was never pushed; push it first"
                )


def _references(value: Any, owner: str, name: str) -> list[DBRef]:
    if value is None:
        return []
    if isinstance(value, DBRef):
        return [value]
    if isinstance(value, (list, tuple)):
        return [ref for item in value for ref in _references(item, owner, name)]
    raise PushError(f"{owner}.{name} is a dependency field but holds {type(value).__name__}, not a Link")


def linked_ids(owner: str, links: Sequence[LinkField], document: Mapping[str, Any]) -> set[Any]:
    """The ids of every task a stored form links through its dependency fields."""
    return {ref.id for link in links for ref in _references(document.get(link.name), owner, link.name)}


@dataclass
class PushPlan:
    """What a push of a dependent still has to do after its insert."""

    owner: Store
    pending: dict[str, list[Any]]  # collection name -> ids of dependencies in flight
    fields_of: dict[Any, list[str]]  # dependency id -> link fields naming it
    outcome: Verdict

    async def register(self, task_id: Any) -> bool:
        """Tell each in-flight dependency that a dependent waits; apply those that ended meanwhile.

        One ``update_many`` per linked collection; a dependency that ended between the
        push's read and this write is applied here (its finisher may have told the
        dependent too: telling twice changes nothing). Returns whether the dependent's
        state may have changed.
        """
        if self.outcome is not WAITING:
            return False
        touched = False
        collection = self.owner.raw
        for name, ids in self.pending.items():
            matched = await self.owner.register_dependent(name, ids)
            if matched == len(ids):
                continue
            states = await self.owner.states_of(name, ids)
            for dependency_id in ids:
                row = states.get(dependency_id)
                state = DELETED if row is None else state_value(row.get("state"))
                if state in store.IN_FLIGHT:
                    continue  # requeued in between: it was registered (or will be by the sweep)
                ended = Ended(self.owner.raw.database[name], dependency_id, state, (row or {}).get("error"))
                touched = True
                failed = await _tell_one(collection, task_id, self.fields_of[dependency_id], ended)
                if failed is not None:
                    await propagate(failed, None)
        return touched


@dataclass
class LinkRequest:
    """What a dependent's push must read: the linked ids, per collection, and the fields naming each."""

    summary: dict[str, dict[str, Any]]  # the dependent's future ``dep_links``
    fields_of: dict[Any, list[str]]  # dependency id -> link fields naming it
    by_collection: dict[str, list[Any]]  # collection name -> dependency ids


def link_request(owner_name: str, links: Sequence[LinkField], document: Mapping[str, Any]) -> LinkRequest:
    """The reads a dependent's push needs (pure); raises PushError on a bad link, before anything is sent."""
    summary: dict[str, dict[str, Any]] = {}
    fields_of: dict[Any, list[str]] = {}
    collection_of: dict[Any, str] = {}
    for link in links:
        references = _references(document.get(link.name), owner_name, link.name)
        names = {ref.collection for ref in references}
        if len(names) > 1:
            raise PushError(
                f"{owner_name}.{link.name} links tasks in several collections ({sorted(names)}); "
                "use one field per class"
            )
        name = names.pop() if names else ""
        ids = list(dict.fromkeys(ref.id for ref in references))
        summary[link.name] = {
            "kind": link.kind.value,
            "on_failure": link.on_failure.value,
            "c": name,
            "n": len(ids),
            "ok": 0,
            "bad": 0,
        }
        for dependency_id in ids:
            fields_of.setdefault(dependency_id, []).append(link.name)
            collection_of[dependency_id] = name
    if len(fields_of) > MAX_LINKS_PER_TASK:
        raise PushError(
            f"{owner_name} links {len(fields_of):,} tasks; a task may depend on at most {MAX_LINKS_PER_TASK:,} "
            "(link an intermediate task that depends on a share of them instead)"
        )
    by_collection: dict[str, list[Any]] = {}
    for dependency_id, name in collection_of.items():
        by_collection.setdefault(name, []).append(dependency_id)
    return LinkRequest(summary, fields_of, by_collection)


def plan_push(
    owner: Store,
    owner_name: str,
    request: LinkRequest,
    states: Mapping[str, Mapping[Any, Mapping[str, Any]]],
    document: dict[str, Any],
) -> PushPlan:
    """Set the new document's readiness from its links' ``states`` (pure): ready, parked, or failed at once.

    ``states`` holds, per collection, what ``Store.states_of`` read. A link to a task
    that does not exist raises PushError.
    """
    summary = request.summary
    pending: dict[str, list[Any]] = {}
    wait: list[dict[str, Any]] = []
    for name, ids in request.by_collection.items():
        found = states.get(name, {})
        for dependency_id in ids:
            fields = request.fields_of[dependency_id]
            row = found.get(dependency_id)
            if row is None:
                raise PushError(
                    f"{owner_name}.{fields[0]} links {name} {dependency_id}, "
                    "which does not exist (not pushed, or deleted)"
                )
            if "state" not in row:
                raise PushError(f"{owner_name}.{fields[0]} links {name} {dependency_id}, which is not a task")
            state = state_value(row["state"])
            if state in store.IN_FLIGHT:
                pending.setdefault(name, []).append(dependency_id)
                wait.append({"i": dependency_id, "f": fields})
                continue
            ended = Ended(owner.raw.database[name], dependency_id, state, row.get("error"))
            mark = mark_of(ended)
            for field_name in fields:
                if mark is None:
                    summary[field_name]["ok"] += 1
                else:
                    summary[field_name]["bad"] += 1
                    summary[field_name]["cause"] = mark
    outcome = verdict(summary)
    document["dep_links"] = summary
    if owner.partition_field is not None:
        document["dep_pk"] = {owner.partition_field: document.get(owner.partition_field)}
    if owner.options.ttl is not None:
        document["dep_ttl"] = owner.options.ttl
    if outcome.failure is not None:
        document.update(
            owner.terminal_fields(State.FAILED, owner.now()) | {"error": outcome.failure, "dep_failed": True}
        )
        document.pop("dedupe_slot", None)
    elif not outcome.ready:
        document["dep_run_at"] = document["run_at"]
        document["run_at"] = clock.FAR_FUTURE
        document["dep_blocked"] = True
        document["dep_wait"] = wait
    return PushPlan(owner, pending, request.fields_of, outcome)


async def prepare_push(
    owner: Store, owner_name: str, links: Sequence[LinkField], document: dict[str, Any]
) -> PushPlan | None:
    """Read the linked tasks' states and set the new document's readiness; None without links.

    A link to a task that does not exist (never pushed, or deleted), or more than
    ``MAX_LINKS_PER_TASK`` links, raises PushError before anything is written. A
    dependent that is not ready yet is parked.
    """
    if not links:
        return None
    request = link_request(owner_name, links, document)
    states = {name: await owner.states_of(name, ids) for name, ids in request.by_collection.items()}
    return plan_push(owner, owner_name, request, states, document)


# ------------------------------------------------------------------ pushing in bulk
# ``push_many`` pays for links per chunk, not per dependent: one read per linked
# collection before the insert, one registration per linked collection after it.

# Dependency ids per read or registration command (a chunk of dependents may link many).
IDS_PER_COMMAND = 10_000


def pages(ids: Sequence[Any]) -> list[list[Any]]:
    return [list(ids[start : start + IDS_PER_COMMAND]) for start in range(0, len(ids), IDS_PER_COMMAND)]


async def prepare_pushes(
    owner: Store, owner_name: str, drafts: Sequence[tuple[Sequence[LinkField], dict[str, Any]]]
) -> list[PushPlan | PushError | None]:
    """``prepare_push`` for many dependents of one class, with one read per linked collection for them all.

    One entry per draft: its plan, None without links, or the PushError that rejects it.
    """
    requests: list[LinkRequest | PushError | None] = []
    wanted: dict[str, dict[Any, None]] = {}
    for links, document in drafts:
        if not links:
            requests.append(None)
            continue
        try:
            request = link_request(owner_name, links, document)
        except PushError as exc:
            requests.append(exc)
            continue
        requests.append(request)
        for name, ids in request.by_collection.items():
            wanted.setdefault(name, {}).update(dict.fromkeys(ids))
    states: dict[str, dict[Any, dict[str, Any]]] = {}
    for name, unique in wanted.items():
        for page in pages(list(unique)):
            states.setdefault(name, {}).update(await owner.states_of(name, page))
    plans: list[PushPlan | PushError | None] = []
    for entry, (_, document) in zip(requests, drafts, strict=True):
        if not isinstance(entry, LinkRequest):
            plans.append(entry)
            continue
        try:
            plans.append(plan_push(owner, owner_name, entry, states, document))
        except PushError as exc:
            plans.append(exc)
    return plans


async def register_many(owner: Store, plans: Sequence[tuple[PushPlan, Any]]) -> set[Any]:
    """``PushPlan.register`` for many stored dependents: one ``update_many`` per linked collection.

    A collection where fewer dependencies matched than were named (one ended in
    between) falls back to each of its dependents' own ``register``, which applies what
    ended. Returns the ids of the dependents whose state may have changed.
    """
    waiting = [(plan, task_id) for plan, task_id in plans if plan.outcome is WAITING]
    linked: dict[str, dict[Any, None]] = {}
    for plan, _ in waiting:
        for name, pending in plan.pending.items():
            linked.setdefault(name, {}).update(dict.fromkeys(pending))
    short: set[str] = set()
    for name, unique in linked.items():
        for page in pages(list(unique)):
            if await owner.register_dependent(name, page) < len(page):
                short.add(name)
    touched: set[Any] = set()
    for plan, task_id in waiting:
        if short & plan.pending.keys() and await plan.register(task_id):
            touched.add(task_id)
    return touched


# ------------------------------------------------------------------ pushing from sync code
# The same reads, plan and registration as above, sent through a ``SyncStore``.


def prepare_push_sync(
    owner: SyncStore, owner_name: str, links: Sequence[LinkField], document: dict[str, Any]
) -> PushPlan | None:
    """``prepare_push`` for a sync producer."""
    if not links:
        return None
    request = link_request(owner_name, links, document)
    states = {name: owner.states_of(name, ids) for name, ids in request.by_collection.items()}
    return plan_push(owner.shape, owner_name, request, states, document)


def register_sync(plan: PushPlan, owner: SyncStore, task_id: Any) -> bool:
    """``PushPlan.register`` for a sync producer: returns whether the dependent's state may have changed.

    A dependency that ended between the push's read and the registration is applied
    here; should that fail the new task while something already waits for it (it was
    linked within that instant), its own dependents are told by the repair sweep.
    """
    if plan.outcome is not WAITING:
        return False
    touched = False
    for name, ids in plan.pending.items():
        if owner.register_dependent(name, ids) == len(ids):
            continue
        states = owner.states_of(name, ids)
        for dependency_id in ids:
            row = states.get(dependency_id)
            state = DELETED if row is None else state_value(row.get("state"))
            if state in store.IN_FLIGHT:
                continue
            touched = True
            ended = Ended(owner.shape.raw.database[name], dependency_id, state, (row or {}).get("error"))
            snapshot = owner.tell(task_id, dependency_id, plan.fields_of[dependency_id], mark_of(ended))
            outcome = decision(snapshot) if snapshot is not None else None
            if snapshot is None or outcome is None:
                continue
            if outcome.ready:
                owner.release_parked(snapshot, snapshot.get("dep_run_at") or owner.shape.now())
            elif outcome.failure is not None:
                failed = owner.fail_parked(snapshot, outcome.failure, snapshot.get("dep_ttl"))
                if failed is not None and failed.get("dependents_pending"):
                    log.warning("%s %s failed: its dependents are told by the repair sweep", owner.shape.name, task_id)
    return touched


# ------------------------------------------------------------------ requeueing

# What a failed dependent's fresh readiness writes (``prepare_push`` computes them).
READINESS_FIELDS = ("dep_links", "dep_pk", "dep_ttl", "dep_run_at", "run_at", "dep_blocked", "dep_wait")


@dataclass
class Restored:
    """Dependents put back to wait for requeued tasks, and those left FAILED with the reason."""

    restored: int = 0
    skipped: list[tuple[Any, str]] = field(default_factory=list)


def _by_cause(rows: Sequence[Mapping[str, Any]]) -> dict[Any, list[Mapping[str, Any]]]:
    """Failed dependents indexed by the id of each dependency whose failure is recorded as their cause."""
    found: dict[Any, list[Mapping[str, Any]]] = {}
    for row in rows:
        links = row.get("dep_links")
        for link in links.values() if isinstance(links, Mapping) else ():
            cause = link.get("cause") if isinstance(link, Mapping) else None
            if isinstance(cause, Mapping) and "id" in cause:
                found.setdefault(cause["id"], []).append(row)
    return found


def _store_for(collection: Any, document: Mapping[str, Any]) -> Store | None:
    """The registered store of the dependent's class: the most specific one that owns it."""
    owners = [s for s in store.stores_in(str(collection.name), collection.database) if s.owns(document)]
    # The most specific class first; among equals, one on this very client (sorted() is stable).
    owners.sort(key=lambda s: len(str(s.scope())))
    return owners[0] if owners else None


async def _restore_one(collection: Any, dependent_id: Any) -> str | None:
    """Requeue one dependent failed by its links, waiting again for them; the reason it stays FAILED, or None."""
    document = await store.read_task(collection, dependent_id)
    if document is None or document.get("state") != State.FAILED.value or not document.get("dep_failed"):
        return "it is no longer FAILED because of a dependency"
    owner = _store_for(collection, document)
    if owner is None:
        return f"its class (collection {collection.name!r}) is not imported in this process"
    try:
        links = tuple(
            LinkField(name, DependencyType(link["kind"]), OnFailure(link["on_failure"]))
            for name, link in document["dep_links"].items()
        )
        fresh = {k: v for k, v in document.items() if not k.startswith("dep_")}
        fresh["run_at"] = owner.now()
        plan = await prepare_push(owner, owner.name, links, fresh)
    except PushError as exc:
        return f"a dependency can no longer be linked ({exc})"
    except BAD_BOOKKEEPING as exc:
        return f"its dependency bookkeeping is malformed ({type(exc).__name__}: {exc})"
    assert plan is not None
    if plan.outcome.failure is not None:
        return f"a dependency is still failed: {plan.outcome.failure}"
    fields = {name: fresh[name] for name in READINESS_FIELDS if name in fresh}
    try:
        if not await store.restore_dependent(collection, document, fields):
            return "it changed while being requeued"
    except DuplicateKeyError:
        return f"its dedupe_key {document.get('dedupe_key')!r} is taken by a live task"
    await plan.register(dependent_id)
    return None


async def requeue_dependents(owner: Store, parents: Sequence[Mapping[str, Any]]) -> Restored:
    """Requeue, down the graph, the dependents that failed because one of ``parents`` (just requeued) failed.

    Each waits again for its links, as if pushed now, so it runs after them. Dependents
    are found by the cause each keeps; one ``find`` per collection reads every task there
    that failed by its links (an admin operation, not a hot path).
    """
    outcome = Restored()
    database = owner.raw.database
    failed_in: dict[str, dict[Any, list[Mapping[str, Any]]]] = {}
    seen: set[Any] = set()
    work = [(row["_id"], row) for row in parents]
    while work:
        parent_id, parent = work.pop()
        try:
            names = dependents_in(parent)
        except TypeError as exc:
            log.error("%s %s: %s; its dependents were not requeued", owner.name, parent_id, exc)
            continue
        for name in names:
            if name not in failed_in:
                failed_in[name] = _by_cause(await store.failed_by_links(database[name]))
            for row in failed_in[name].pop(parent_id, []):
                if row["_id"] in seen:
                    continue
                seen.add(row["_id"])
                reason = await _restore_one(database[name], row["_id"])
                if reason is None:
                    outcome.restored += 1
                    work.append((row["_id"], row))
                else:
                    outcome.skipped.append((row["_id"], reason))
    return outcome


# ------------------------------------------------------------------ repair

_last_reconcile: dict[tuple[str, str, str], float] = {}


async def sweep(owner: Store, *, reconcile: bool | None = None, has_links: bool = True) -> int:
    """Repair what a crash or a deletion can leave behind; returns how many tasks it touched.

    1. Tasks of this class that ended while dependents were still to be told
       (the process died between the two): tell them now (``tell_unfinished``).
    2. ``reconcile`` (by default at most every ``RECONCILE_EVERY`` seconds, for classes
       with link fields): check a page of this class's parked tasks against their
       links (``reconcile_parked``).

    A malformed document is set aside, with its reason, and the sweep goes on.
    """
    touched = await tell_unfinished(owner)
    if not has_links:
        return touched
    if reconcile is None:
        reconcile = reconcile_due(owner)
    if reconcile:
        touched += await reconcile_parked(owner)
    return touched


async def tell_unfinished(owner: Store, class_ids: Sequence[str] | None = None) -> int:
    """Tell the dependents of this class's (or ``class_ids``') ended tasks whose finisher died first.

    One indexed ``find``; returns how many ended tasks it found.
    """
    touched = 0
    for row in await owner.pending_dependencies(RECONCILE_BATCH, class_ids):
        touched += 1
        try:
            ended = Ended(owner.raw, row["_id"], state_value(row["state"]), row.get("error"), dependents_in(row))
            await propagate(ended, owner.options.ttl)
        except BAD_BOOKKEEPING as exc:
            reason = f"dependents bookkeeping is malformed ({type(exc).__name__}: {exc})"
            log.error("%s %s: %s; cleared", owner.name, row.get("_id"), reason)
            await owner.update_guarded({"_id": row["_id"]}, {"$unset": {"dependents_pending": ""}})
    return touched


def _reconcile_key(owner: Store) -> tuple[str, str, str]:
    return (str(owner.raw.database.name), str(owner.raw.name), owner.name)


def reconcile_due(owner: Store) -> bool:
    """Whether this process last checked the class's parked tasks ``RECONCILE_EVERY`` seconds ago or more."""
    return time.monotonic() - _last_reconcile.get(_reconcile_key(owner), float("-inf")) >= RECONCILE_EVERY


def reconciled(owner: Store) -> None:
    """Count the class's parked tasks as checked now (there were none to check)."""
    _last_reconcile[_reconcile_key(owner)] = time.monotonic()


async def reconcile_parked(owner: Store) -> int:
    """Check a page of this class's parked tasks against their links, resuming where the last page ended.

    Successive calls cover them all. A link whose task was deleted fails the field
    (``on_failure`` applies), one that ended is applied, one that never heard of its
    dependent is told again.
    """
    reconciled(owner)
    return await _reconcile(owner)


async def check_dependencies(owner: Store) -> int:
    """Run the full repair sweep now (see ``sweep``); returns how many tasks it touched."""
    return await sweep(owner, reconcile=True)


async def _reconcile(owner: Store) -> int:
    page = await owner.parked_page(owner.reconcile_after, RECONCILE_BATCH)
    owner.reconcile_after = page[-1]["_id"] if len(page) == RECONCILE_BATCH else None
    touched = 0
    for row in page:
        try:
            touched += await _reconcile_one(owner, row)
        except BAD_BOOKKEEPING as exc:
            await _set_aside_dependent(owner.raw, row, exc)
            touched += 1
    return touched


async def _reconcile_one(owner: Store, row: Mapping[str, Any]) -> int:
    links = row.get("dep_links") or {}
    waits = row.get("dep_wait") or []
    if not isinstance(waits, list):
        raise TypeError(f"dep_wait is a {type(waits).__name__}, not a list")
    by_collection: dict[str, dict[Any, list[str]]] = {}
    for entry in waits:
        fields = [str(f) for f in entry["f"]]
        by_collection.setdefault(str(links[fields[0]]["c"]), {})[entry["i"]] = fields
    if not by_collection:
        failed = await _decide(owner.raw, row)  # every link ended: only the decision was lost
        if failed is not None:
            await propagate(failed, None)
        return 1 if failed is not None else 0
    touched = 0
    own = str(owner.raw.name)
    for name, edges in by_collection.items():
        collection = owner.raw.database[name]
        states = await owner.states_of(name, list(edges))
        for dependency_id, fields in edges.items():
            current: Mapping[str, Any] | None = states.get(dependency_id)
            if current is not None and state_value(current.get("state")) in store.IN_FLIGHT:
                known = current.get("dependents_in") or []
                if current.get("dependents_pending") and isinstance(known, list) and own in known:
                    continue  # in flight, and knows about this dependent
                current = await store.ensure_registered(collection, dependency_id, own)
                if current is None:
                    touched += 1
                    continue
            if current:
                ended = Ended(collection, dependency_id, state_value(current.get("state")), current.get("error"))
            else:
                ended = Ended(collection, dependency_id, DELETED, None)
                log.warning("%s %s: its dependency %s %s was deleted", owner.name, row["_id"], name, dependency_id)
            touched += 1
            failed = await _tell_one(owner.raw, row["_id"], fields, ended)
            if failed is not None:
                await propagate(failed, None)
    return touched
