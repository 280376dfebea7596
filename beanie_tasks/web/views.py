"""What each dashboard page shows, read through ``store`` and ``admin``: plain data for the templates."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from bson import DBRef, ObjectId, json_util
from bson.errors import InvalidId

from beanie_tasks import admin, clock, store
from beanie_tasks.dependencies import declared_links, is_collection_name
from beanie_tasks.schedule import Schedule, schedule_key
from beanie_tasks.states import State, state_value
from beanie_tasks.task import Task

PAGE_SIZE = 50
CHART_MINUTES = 60
MINUTE_FORMAT = "%Y-%m-%dT%H:%M"
RUNNING_SHOWN = 20
GRAPH_NODES = 25
# Stored fields every task has: the rest of a document is its payload or bookkeeping.
BOOKKEEPING_PREFIXES = ("dep_", "limit_", "dependents_")
BOOKKEEPING = {"dedupe_slot", "_class_id", "redeliveries"}


class BadRequest(ValueError):
    """A query parameter the dashboard cannot use; its message is shown as is."""


def parse_id(raw: str) -> ObjectId:
    try:
        return ObjectId(raw)
    except (InvalidId, TypeError):
        raise BadRequest(f"{raw!r} is not a task id (24 hexadecimal characters)") from None


def encode_cursor(row: Mapping[str, Any], sort_name: str) -> str:
    sort, _index, _state = store.LIST_SORTS[sort_name]
    values = {name: row.get(name) for name, _ in sort}
    return base64.urlsafe_b64encode(json_util.dumps(values).encode()).decode()


def decode_cursor(raw: str | None, sort_name: str) -> dict[str, Any] | None:
    if not raw:
        return None
    sort, _index, _state = store.LIST_SORTS[sort_name]
    try:
        values = json_util.loads(base64.urlsafe_b64decode(raw.encode()).decode())
    except (ValueError, TypeError, UnicodeDecodeError):
        raise BadRequest("the page cursor is damaged; start again from the first page") from None
    if not isinstance(values, dict) or set(values) != {name for name, _ in sort}:
        raise BadRequest("the page cursor belongs to another order; start again from the first page")
    return values


def as_text(value: Any) -> str:
    """A stored value as readable text (JSON for documents and lists)."""
    if isinstance(value, str):
        return value
    return json.dumps(plain(value), indent=2, ensure_ascii=False)


def plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, datetime):
        return clock.as_utc(value).isoformat()
    if isinstance(value, DBRef):
        return {"$ref": value.collection, "$id": str(value.id)}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def split_fields(task_class: type[Task], document: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A document's payload (the subclass's own fields) and the queue's fields."""
    base = set(Task.model_fields) | {"_id"}
    payload: dict[str, Any] = {}
    queue: dict[str, Any] = {}
    for key, value in document.items():
        if key in BOOKKEEPING or key.startswith(BOOKKEEPING_PREFIXES):
            continue
        (queue if key in base else payload)[key] = value
    return payload, queue


# ------------------------------------------------------------------ overview


@dataclass
class ClassSummary:
    name: str
    collection: str
    counts: dict[str, int]
    backlog: int
    oldest_ready_seconds: float | None
    chart: list[tuple[int, int]]
    chart_peak: int
    running: list[dict[str, Any]]


async def class_summary(task_class: type[Task], now: datetime) -> ClassSummary:
    task_store = task_class.task_store()
    counts = {state.value: n for state, n in (await admin.counts(task_store)).items()}
    oldest = await task_store.oldest_ready(now)
    since = now.replace(second=0, microsecond=0) - timedelta(minutes=CHART_MINUTES - 1)
    buckets = [[0, 0] for _ in range(CHART_MINUTES)]
    for row in await task_store.ended_per_minute(since):
        key = row.get("_id") or {}
        try:
            minute = datetime.strptime(str(key.get("minute")), MINUTE_FORMAT).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
        index = int((minute - since).total_seconds() // 60)
        if 0 <= index < CHART_MINUTES:
            buckets[index][0 if state_value(key.get("state")) == State.FINISHED.value else 1] += int(row.get("n", 0))
    chart = [(ok, bad) for ok, bad in buckets]
    running = await task_store.running_page(RUNNING_SHOWN)
    return ClassSummary(
        name=task_class.__name__,
        collection=task_class.collection().name,
        counts=counts,
        backlog=await task_store.count_ready(now),
        oldest_ready_seconds=(now - oldest).total_seconds() if oldest is not None else None,
        chart=chart,
        chart_peak=max([1, *(ok + bad for ok, bad in chart)]),
        running=running,
    )


async def overview(classes: Sequence[type[Task]]) -> dict[str, Any]:
    now = clock.now(classes[0].collection())
    summaries = [await class_summary(cls, now) for cls in classes]
    databases = {id(cls.collection().database): cls.collection().database for cls in classes}
    workers = [row for database in databases.values() for row in await store.recent_workers(database)]
    return {"now": now, "summaries": summaries, "workers": workers}


# ------------------------------------------------------------------ lists


@dataclass
class ListQuery:
    state: str | None = None
    priority: int | None = None
    dedupe_key: str | None = None
    search: str | None = None
    sort: str = "newest"
    after: str | None = None

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> ListQuery:
        state = (params.get("state") or "").upper() or None
        if state is not None and state not in {s.value for s in State}:
            raise BadRequest(f"unknown state {state!r}; use {', '.join(s.value for s in State)}")
        raw_priority = params.get("priority") or None
        try:
            priority = int(raw_priority) if raw_priority is not None else None
        except ValueError:
            raise BadRequest(f"priority must be a whole number, got {raw_priority!r}") from None
        sort = params.get("sort") or "newest"
        if sort not in store.LIST_SORTS:
            raise BadRequest(f"unknown order {sort!r}; use {', '.join(store.LIST_SORTS)}")
        if store.LIST_SORTS[sort][2] and state is None:
            raise BadRequest(f"the {sort!r} order needs a state: choose one")
        return cls(
            state=state,
            priority=priority,
            dedupe_key=params.get("dedupe_key") or None,
            search=(params.get("q") or "").strip() or None,
            sort=sort,
            after=params.get("after") or None,
        )

    def selector(self, task_store: store.Store) -> dict[str, Any]:
        """The filter: a search that is a task id looks the id up; any other text searches errors."""
        task_id = None
        error_text = None
        if self.search is not None:
            try:
                task_id = ObjectId(self.search)
            except (InvalidId, TypeError):
                error_text = self.search
        return task_store.list_filter(
            state=self.state,
            priority=self.priority,
            dedupe_key=self.dedupe_key,
            error_text=error_text,
            task_id=task_id,
        )

    def params(self, **changes: Any) -> dict[str, str]:
        values = {
            "state": self.state,
            "priority": self.priority,
            "dedupe_key": self.dedupe_key,
            "q": self.search,
            "sort": self.sort,
        } | changes
        return {k: str(v) for k, v in values.items() if v is not None}


@dataclass
class Page:
    rows: list[dict[str, Any]]
    next_after: str | None
    query: ListQuery
    extra: dict[str, Any] = field(default_factory=dict)


async def task_page(task_class: type[Task], query: ListQuery, limit: int = PAGE_SIZE) -> Page:
    task_store = task_class.task_store()
    after = decode_cursor(query.after, query.sort)
    rows = await task_store.list_page(query.selector(task_store), query.sort, after, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    next_after = encode_cursor(rows[-1], query.sort) if more and rows else None
    return Page(rows=rows, next_after=next_after, query=query)


async def selected_ids(task_class: type[Task], query: ListQuery, limit: int) -> list[Any]:
    """The ids of the filtered selection (every page, up to ``limit``), for a bulk action."""
    task_store = task_class.task_store()
    selector = query.selector(task_store)
    ids: list[Any] = []
    after = None
    while len(ids) < limit:
        rows = await task_store.list_page(selector, query.sort, after, min(500, limit - len(ids)))
        if not rows:
            break
        ids.extend(row["_id"] for row in rows)
        after = {name: rows[-1].get(name) for name, _ in store.LIST_SORTS[query.sort][0]}
    return ids


# ------------------------------------------------------------------ detail and graph


@dataclass
class Node:
    id: str
    state: str
    class_name: str | None
    collection: str
    relation: str  # "upstream", "self" or "downstream"
    label: str = ""


async def graph(
    task_class: type[Task], document: Mapping[str, Any], classes_by_collection: Mapping[str, type[Task]]
) -> list[Node]:
    """The task, the tasks it depends on (its link fields) and the dependents still waiting for it."""
    task_store = task_class.task_store()
    own = task_class.collection().name
    nodes = [Node(str(document["_id"]), state_value(document.get("state")), task_class.__name__, own, "self")]
    wanted: dict[str, list[tuple[Any, str]]] = {}
    for link in declared_links(task_class):
        value = document.get(link.name)
        refs = value if isinstance(value, list) else [value]
        for ref in refs:
            if isinstance(ref, DBRef) and is_collection_name(ref.collection):
                wanted.setdefault(ref.collection, []).append((ref.id, link.name))
    for collection_name, pairs in wanted.items():
        found = await task_store.states_of(collection_name, [ref for ref, _ in pairs[:GRAPH_NODES]])
        owner = classes_by_collection.get(collection_name)
        for ref, field_name in pairs[:GRAPH_NODES]:
            row = found.get(ref)
            state = state_value(row.get("state")) if row is not None else "DELETED"
            nodes.append(
                Node(str(ref), state, owner.__name__ if owner else None, collection_name, "upstream", field_name)
            )
    recorded = document.get("dependents_in")
    places = list(dict.fromkeys([own, *(recorded if isinstance(recorded, list) else [])]))
    for collection_name in places:
        if not is_collection_name(collection_name):
            continue
        owner = classes_by_collection.get(collection_name)
        for row in await task_store.find_waiting_dependents(collection_name, document["_id"], GRAPH_NODES):
            nodes.append(
                Node(
                    str(row["_id"]),
                    state_value(row.get("state")),
                    owner.__name__ if owner else None,
                    collection_name,
                    "downstream",
                    "waiting",
                )
            )
    return nodes


# ------------------------------------------------------------------ schedules


async def schedules(classes: Sequence[type[Task]]) -> list[dict[str, Any]]:
    periodic = [(cls, Schedule.of(cls)) for cls in classes]
    rows: list[dict[str, Any]] = []
    if not any(schedule for _, schedule in periodic):
        return rows
    now = clock.now(classes[0].collection())
    for cls, schedule in periodic:
        if schedule is None:
            continue
        cursors = await store.schedule_cursors(cls.collection().database, [schedule_key(cls)])
        cursor = cursors.get(schedule_key(cls))
        last = cursor.get("last_slot") if cursor else None
        rows.append(
            {
                "class": cls.__name__,
                "schedule": schedule.describe(),
                "last_slot": clock.as_utc(last) if isinstance(last, datetime) else None,
                "next_slot": schedule.following(now),
            }
        )
    return rows
