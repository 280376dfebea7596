"""Everything that differs between Beanie 2 (PyMongo async) and Beanie 1 (Motor), and nothing else."""

from __future__ import annotations

import inspect
from typing import Any

import beanie
import bson
from beanie import Document
from pymongo import UpdateOne
from pymongo.errors import DocumentTooLarge, OperationFailure, PyMongoError

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


async def close_client(client: Any) -> None:
    outcome = client.close()
    if inspect.isawaitable(outcome):
        await outcome


async def open_change_stream(collection: Any, pipeline: list[dict[str, Any]]) -> Any | None:
    """A change stream on ``collection``, or None where the server or the mock has none."""
    watch = getattr(collection, "watch", None)
    if watch is None or not callable(watch):
        return None
    try:
        stream = watch(pipeline)
        if inspect.isawaitable(stream):
            stream = await stream
    except (NotImplementedError, TypeError, AttributeError, OperationFailure):
        return None
    return stream


MAX_DOCUMENT_BYTES = 16 * 1024 * 1024


def check_document_size(collection: Any, document: dict[str, Any]) -> None:
    """mongomock stores documents of any size: enforce MongoDB's 16 MB limit as a server would."""
    if is_mock(collection) and len(bson.encode(document)) > MAX_DOCUMENT_BYTES:
        raise DocumentTooLarge(f"BSON document too large; MongoDB allows up to {MAX_DOCUMENT_BYTES} bytes")


def is_mock(collection: Any) -> bool:
    return any(cls.__module__.startswith("mongomock") for cls in type(collection).__mro__)


def only_present(field: str, collection: Any) -> dict[str, Any]:
    """Index options that skip documents lacking ``field``.

    A partial index is right on MongoDB; mongomock ignores partial filters, so it gets
    the equivalent sparse index (the field is only ever absent, never null).
    """
    if is_mock(collection):
        return {"sparse": True}
    return {"partialFilterExpression": {field: {"$type": "string"}}}


async def aggregate(collection: Any, pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cursor = collection.aggregate(pipeline)
    if inspect.isawaitable(cursor):
        cursor = await cursor
    return [row async for row in cursor]


async def bulk_update(collection: Any, updates: list[tuple[dict[str, Any], dict[str, Any]]]) -> int:
    """Apply ``(filter, update)`` pairs in one unordered ``bulk_write``; returns how many matched.

    mongomock cannot take the ``UpdateOne`` of PyMongo >= 4.11 (it passes ``sort``), so
    there the updates run one by one.
    """
    if is_mock(collection):
        matched = 0
        for selector, update in updates:
            matched += (await collection.update_one(selector, update)).matched_count
        return matched
    result = await collection.bulk_write([UpdateOne(s, u) for s, u in updates], ordered=False)
    return int(result.matched_count)


def index_hint(collection: Any, index_name: str) -> dict[str, Any]:
    """A ``hint`` option pinning a query to one index; mongomock has no planner and takes none."""
    if is_mock(collection):
        return {}
    return {"hint": index_name}
