"""Everything that differs between Beanie 2 (PyMongo async), Beanie 1 (Motor) and the in-process mock.

Core code never asks which backend it runs on: it calls the helpers here, which look
up the backend's ``Traits`` once per collection type.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import beanie
import bson
from beanie import Document
from pymongo import ReadPreference, UpdateOne
from pymongo.errors import BulkWriteError, DocumentTooLarge, OperationFailure, PyMongoError

from beanie_tasks.redact import scrub, secrets_in

BEANIE_MAJOR = int(beanie.__version__.split(".")[0])


def collection_of(document: type[Document]) -> Any:
    """The raw async collection behind a Beanie document class."""
    if BEANIE_MAJOR >= 2:
        return document.get_pymongo_collection()
    return document.get_motor_collection()  # type: ignore[attr-defined,unused-ignore]


def client_for(uri: str, **options: Any) -> Any:
    """An async client of the kind the installed Beanie accepts.

    ``options`` (TLS, auth, timeouts...) reach the driver unchanged; a URI the driver
    rejects is reported without its password.
    """
    options.setdefault("tz_aware", True)
    try:
        if BEANIE_MAJOR >= 2:
            from pymongo import AsyncMongoClient

            return AsyncMongoClient(uri, **options)
        from motor.motor_asyncio import AsyncIOMotorClient

        return AsyncIOMotorClient(uri, **options)
    except (PyMongoError, ValueError, TypeError) as exc:
        message = scrub(str(exc), secrets_in(uri))
        if message == str(exc):
            raise
        raise type(exc)(message) from None


def async_twin_of(client: Any, **options: Any) -> Any:
    """An async client (of the kind Beanie accepts) to the same servers, with the same settings, as
    the PyMongo sync ``client`` an app handed over.

    PyMongo keeps a client's constructor arguments (as its own ``_duplicate`` uses them) but
    not its URI; this is the one place that reads them, so the difference stays here.
    """
    settings = getattr(client, "_init_kwargs", None)
    if not isinstance(settings, dict):
        raise TypeError(f"cannot tell which servers a {type(client).__name__} connects to; pass the URI instead")
    arguments = {k: v for k, v in settings.items() if k not in ("document_class", "type_registry", "connect")}
    host = arguments.pop("host", None)
    port = arguments.pop("port", None)
    arguments.update(options)
    arguments["tz_aware"] = True
    hosts = host if isinstance(host, str) or host is None else list(host)
    if BEANIE_MAJOR >= 2:
        from pymongo import AsyncMongoClient

        return AsyncMongoClient(hosts, port, **arguments)
    from motor.motor_asyncio import AsyncIOMotorClient

    return AsyncIOMotorClient(hosts, port, **arguments)


async def close_client(client: Any) -> None:
    outcome = client.close()
    if inspect.isawaitable(outcome):
        await outcome


async def open_change_stream(
    collection: Any, pipeline: list[dict[str, Any]], *, max_await: float | None = None
) -> Any | None:
    """A change stream on ``collection`` (or a database), or None where the server or the mock has none.

    ``max_await`` bounds how long each ``getMore`` waits on the server for a change.
    """
    watch = getattr(collection, "watch", None)
    if watch is None or not callable(watch):
        return None
    options = {"max_await_time_ms": max(1, int(max_await * 1000))} if max_await is not None else {}
    try:
        stream = watch(pipeline, **options)
        if inspect.isawaitable(stream):
            stream = await stream
    except (NotImplementedError, TypeError, AttributeError, OperationFailure):
        return None
    return stream


def open_change_stream_sync(collection: Any, pipeline: list[dict[str, Any]], max_await: float) -> Any | None:
    """A change stream through PyMongo's sync client whose ``try_next`` waits up to ``max_await`` seconds;
    None where the server or the mock has none."""
    watch = getattr(collection, "watch", None)
    if watch is None or not callable(watch):
        return None
    try:
        return watch(pipeline, max_await_time_ms=max(1, int(max_await * 1000)))
    except (NotImplementedError, TypeError, AttributeError, OperationFailure):
        return None


MAX_DOCUMENT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Traits:
    """What one backend can do; mongomock differs from a server in each of these."""

    in_process: bool  # mongomock: no server, no planner, no clock of its own
    enforces_size: bool  # refuses documents over 16 MB
    takes_hints: bool
    partial_indexes: bool
    removes_in_pipeline: bool  # "$$REMOVE" in a pipeline update drops an existing field
    sorted_bulk_updates: bool  # accepts PyMongo >= 4.11's UpdateOne (which passes ``sort``)
    read_preferences: bool  # ``with_options(read_preference=...)`` returns a usable async collection
    unions: bool  # ``$unionWith`` in an aggregation pipeline (MongoDB 4.4+)


_known_traits: dict[type, Traits] = {}


def _traits_of(collection_type: type) -> Traits:
    mock = any(klass.__module__.startswith("mongomock") for klass in collection_type.__mro__)
    return Traits(
        in_process=mock,
        enforces_size=not mock,
        takes_hints=not mock,
        partial_indexes=not mock,
        removes_in_pipeline=not mock,
        sorted_bulk_updates=not mock,
        read_preferences=not mock,
        unions=not mock,
    )


def traits(collection: Any) -> Traits:
    """The backend's traits, worked out once per collection type."""
    kind = type(collection)
    known = _known_traits.get(kind)
    if known is None:
        known = _known_traits[kind] = _traits_of(kind)
    return known


_primaries: dict[int, tuple[Any, Any]] = {}


def primary(collection: Any) -> Any:
    """``collection`` with reads pinned to the primary, whatever the app's default read preference.

    The queue's bookkeeping reads (a dependency's state, a batch's read-back) must see
    its own writes; a secondary may lag. Built once per collection object.
    """
    if not traits(collection).read_preferences:
        return collection
    known = _primaries.get(id(collection))
    if known is not None and known[0] is collection:
        return known[1]
    pinned = collection.with_options(read_preference=ReadPreference.PRIMARY)
    _primaries[id(collection)] = (collection, pinned)
    return pinned


async def server_time(collection: Any) -> datetime | None:
    """The server's wall clock (``hello``'s ``localTime``), or None where there is no server clock."""
    if traits(collection).in_process:
        return None
    reply = await collection.database.command("hello")
    value = reply.get("localTime")
    return value if isinstance(value, datetime) else None


def server_time_sync(collection: Any) -> datetime | None:
    """``server_time`` through PyMongo's sync client (``beanie_tasks.sync``)."""
    if traits(collection).in_process:
        return None
    value = collection.database.command("hello").get("localTime")
    return value if isinstance(value, datetime) else None


def check_document_size(collection: Any, document: dict[str, Any]) -> None:
    """mongomock stores documents of any size: enforce MongoDB's 16 MB limit as a server would."""
    if not traits(collection).enforces_size and len(bson.encode(document)) > MAX_DOCUMENT_BYTES:
        raise DocumentTooLarge(f"BSON document too large; MongoDB allows up to {MAX_DOCUMENT_BYTES} bytes")


def check_storable(collection: Any, update: dict[str, Any]) -> None:
    """mongomock writes part of an update BSON cannot encode before it fails: encode it first, as a driver would."""
    if not traits(collection).enforces_size:
        bson.encode({name: value for name, value in update.items() if isinstance(value, dict)})


def only_present(field: str, collection: Any) -> dict[str, Any]:
    """Index options that skip documents lacking ``field`` (a string).

    A partial index is right on MongoDB; mongomock ignores partial filters, so it gets
    the equivalent sparse index (the field is only ever absent, never null).
    """
    if not traits(collection).partial_indexes:
        return {"sparse": True}
    return {"partialFilterExpression": {field: {"$type": "string"}}}


def unique_among_present(lead: list[tuple[str, Any]], field: str, collection: Any) -> list[tuple[str, Any]]:
    """The keys of a unique index over ``field`` within ``lead`` (partition, class), for documents having ``field``.

    mongomock can only emulate "documents having the field" with a sparse index, and a
    sparse compound index holds every document that has any of its keys: there the
    index is on ``field`` alone, so uniqueness is not scoped by partition or class.
    """
    if not traits(collection).partial_indexes:
        return [(field, 1)]
    return [*lead, (field, 1)]


def only_flagged(field: str, collection: Any) -> dict[str, Any]:
    """Index options that keep only documents where ``field`` is true (sparse on mongomock)."""
    if not traits(collection).partial_indexes:
        return {"sparse": True}
    return {"partialFilterExpression": {field: True}}


async def aggregate(collection: Any, pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cursor = collection.aggregate(pipeline)
    if inspect.isawaitable(cursor):
        cursor = await cursor
    return [row async for row in cursor]


# The server's code for an aggregation stage it does not know.
UNRECOGNIZED_STAGE = 40324
# Clients whose server refused ``$unionWith`` (older than 4.4, or a look-alike): asked branch by branch.
# Keyed by the client object itself (clients to one server compare equal), through a weak reference.
_without_unions: dict[int, weakref.ref[Any]] = {}


def _refuses_unions(client: Any) -> bool:
    entry = _without_unions.get(id(client))
    return entry is not None and entry() is client


async def union_aggregate(database: Any, branches: Sequence[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """The rows of several pipelines, each on its own collection of ``database``, read from the primary.

    One ``aggregate``: the first pipeline, then a ``$unionWith`` for each other one.
    mongomock has no ``$unionWith``, nor has a server that refuses it (remembered per
    client): there each pipeline is its own ``aggregate``.
    """
    if not branches:
        return []
    (name, pipeline), rest = branches[0], branches[1:]
    first = database[name]
    if traits(first).unions and not _refuses_unions(database.client):
        combined = [*pipeline, *({"$unionWith": {"coll": other, "pipeline": steps}} for other, steps in rest)]
        try:
            return await aggregate(primary(first), combined)
        except OperationFailure as exc:
            if exc.code != UNRECOGNIZED_STAGE and "$unionWith" not in str(exc):
                raise
            with contextlib.suppress(TypeError):  # a client without weak references asks again each time
                _without_unions[id(database.client)] = weakref.ref(database.client)
    rows = []
    for other, steps in branches:
        rows.extend(await aggregate(primary(database[other]), steps))
    return rows


async def bulk_update(collection: Any, updates: list[tuple[dict[str, Any], dict[str, Any]]]) -> int:
    """Apply ``(filter, update)`` pairs in one unordered ``bulk_write``; returns how many matched.

    mongomock cannot take the ``UpdateOne`` of PyMongo >= 4.11 (it passes ``sort``), so
    there the updates run one by one.
    """
    if not traits(collection).sorted_bulk_updates:
        matched = 0
        for selector, update in updates:
            matched += (await collection.update_one(selector, update)).matched_count
        return matched
    result = await collection.bulk_write([UpdateOne(s, u) for s, u in updates], ordered=False)
    return int(result.matched_count)


def index_hint(collection: Any, index_name: str) -> dict[str, Any]:
    """A ``hint`` option pinning a query to one index; mongomock has no planner and takes none."""
    if not traits(collection).takes_hints:
        return {}
    return {"hint": index_name}


async def remove_fields_after_pipeline(collection: Any, selector: dict[str, Any], fields: list[str]) -> None:
    """mongomock treats ``"$$REMOVE"`` as a no-op on an existing field: drop those fields by hand there."""
    if not traits(collection).removes_in_pipeline:
        await collection.update_many(selector, {"$unset": dict.fromkeys(fields, "")})


@dataclass(frozen=True)
class WriteFailure:
    """One document an ``insert_many`` refused: its position, the server's code and message."""

    index: int
    code: int | None
    message: str
    key_fields: tuple[str, ...] = ()  # for a duplicate key: the fields of the unique index it clashed on


def _key_fields(error: dict[str, Any], mock: bool) -> tuple[str, ...]:
    pattern = error.get("keyPattern")
    if isinstance(pattern, dict):
        return tuple(pattern)
    if not mock or error.get("code") != 11000:
        return ()
    # mongomock names the clashing index only inside its message, and an ``_id`` clash not at all.
    message = str(error.get("errmsg", ""))
    _, found, details = message.partition("full error: ")
    if not found:
        return ("_id",)
    try:
        parsed = ast.literal_eval(details)
    except (ValueError, SyntaxError):
        return ()
    pattern = parsed.get("keyPattern") if isinstance(parsed, dict) else None
    return tuple(pattern) if isinstance(pattern, dict) else ()


async def insert_many(collection: Any, documents: list[dict[str, Any]]) -> list[WriteFailure]:
    """One unordered ``insert_many``: every document it can store is stored; returns those refused.

    A write concern error is raised: then nobody knows which documents are durable.
    """
    try:
        await collection.insert_many(documents, ordered=False)
    except BulkWriteError as exc:
        details = exc.details or {}
        if details.get("writeConcernErrors"):
            raise
        mock = traits(collection).in_process
        return [
            WriteFailure(int(error["index"]), error.get("code"), str(error.get("errmsg", "")), _key_fields(error, mock))
            for error in details.get("writeErrors", [])
        ]
    return []


def oversized(documents: list[dict[str, Any]]) -> set[int]:
    """Positions of documents over MongoDB's 16 MB limit (checked by encoding them: only after a refusal)."""
    return {index for index, document in enumerate(documents) if len(bson.encode(document)) > MAX_DOCUMENT_BYTES}
