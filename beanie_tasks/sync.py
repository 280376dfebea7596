"""Pushing tasks from code without an event loop: Flask, Django, scripts, code moving off Celery.

Configure once per process, then push and wait with plain calls::

    import beanie_tasks.sync

    beanie_tasks.sync.init("mongodb://db.example.com/myapp", document_models=[SendEmail])
    task = SendEmail(to="ada@example.com").push_sync()
    done = task.wait_sync(timeout=30)

``push_sync`` and ``wait_sync`` send their commands through PyMongo's sync client
(thread-safe: share it between a web server's threads); they build the same document,
dedupe and dependency bookkeeping as ``push()``, from the same code, so a worker cannot
tell who pushed a task. The normal async ``Worker`` runs what they push.

``init`` sets up each class as ``init_beanie`` does (Beanie's set-up is async, so it
runs once in a private event loop on a short-lived thread, with its own client),
creates the queue's indexes, and measures the server's clock for the sync client.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from beanie import init_beanie
from beanie.exceptions import CollectionWasNotInitialized
from pymongo import MongoClient
from pymongo.errors import ConfigurationError, OperationFailure, PyMongoError, ServerSelectionTimeoutError

from beanie_tasks import driver
from beanie_tasks import store as storage
from beanie_tasks.errors import NotConfigured
from beanie_tasks.redact import redact_uri, scrub, secrets_in
from beanie_tasks.task import Task

__all__ = ["close", "init"]

_client: MongoClient[dict[str, Any]] | None = None
_lock = threading.Lock()


def init(
    uri: str,
    document_models: Sequence[type[Task]],
    *,
    database: str | None = None,
    timeout: float = 10.0,
    **client_options: Any,
) -> None:
    """Set up ``push_sync`` / ``wait_sync`` for ``document_models`` on the database ``uri`` names.

    ``database`` overrides the database in the URI's path; ``client_options`` (TLS,
    auth, pool sizes...) go to ``pymongo.MongoClient``. Calling it again replaces the
    previous set-up. Every mistake is one ``NotConfigured`` line, without the password.
    """
    if not isinstance(uri, str):
        raise NotConfigured(
            f"beanie_tasks.sync.init() takes a MongoDB URI naming the database (mongodb://host/DBNAME), "
            f"not a {type(uri).__name__}"
        )
    models = list(document_models)
    for model in models:
        if not (isinstance(model, type) and issubclass(model, Task)):
            raise NotConfigured(f"beanie_tasks.sync.init(): document_models must be Task subclasses, got {model!r}")
    if not models:
        raise NotConfigured("beanie_tasks.sync.init(): document_models is empty; name the task classes to push")
    secrets = secrets_in(uri)
    client = _connect(uri, timeout, client_options, secrets)
    try:
        try:
            name = client.get_default_database(database).name
        except ConfigurationError:
            raise NotConfigured(
                f"beanie_tasks.sync.init(): the URI {redact_uri(uri)} names no database; "
                "put one in its path (mongodb://host/DBNAME) or pass database="
            ) from None
        _set_up_models(uri, name, models, timeout, client_options, secrets)
        stores = {
            model: storage.SyncStore(model.new_store(client[name][model.get_collection_name()])) for model in models
        }
        next(iter(stores.values())).measure_clock()
        for sync_store in stores.values():
            sync_store.ensure_indexes()
    except ServerSelectionTimeoutError:
        client.close()
        raise NotConfigured(
            f"beanie_tasks.sync.init(): cannot reach MongoDB at {redact_uri(uri)} within {timeout:g} s"
        ) from None
    except OperationFailure as exc:
        client.close()
        if exc.code == 18:
            raise NotConfigured(f"beanie_tasks.sync.init(): authentication failed for {redact_uri(uri)}") from None
        raise NotConfigured(f"beanie_tasks.sync.init(): MongoDB refused: {scrub(str(exc), secrets)}") from None
    except BaseException:
        client.close()
        raise
    global _client
    with _lock:
        previous, _client = _client, client
        storage.forget_sync()
        for model, sync_store in stores.items():
            storage.register_sync(model, sync_store)
    if previous is not None:
        previous.close()


def close() -> None:
    """Close the sync client; ``push_sync`` needs ``init`` again afterwards."""
    global _client
    with _lock:
        previous, _client = _client, None
        storage.forget_sync()
    if previous is not None:
        previous.close()


def _connect(uri: str, timeout: float, options: dict[str, Any], secrets: list[str]) -> MongoClient[dict[str, Any]]:
    millis = int(timeout * 1000)
    options = {"serverSelectionTimeoutMS": millis, "connectTimeoutMS": millis, **options, "tz_aware": True}
    try:
        return MongoClient(uri, **options)
    except (ConfigurationError, PyMongoError, ValueError, TypeError) as exc:
        raise NotConfigured(
            f"beanie_tasks.sync.init(): invalid MongoDB URI or option: {scrub(str(exc), secrets)}"
        ) from None


def _set_up_models(
    uri: str, name: str, models: list[type[Task]], timeout: float, options: dict[str, Any], secrets: list[str]
) -> None:
    """Run ``init_beanie`` for the classes Beanie has not set up in this process yet.

    Classes an async part of the app already set up are left alone: the sync producer
    only needs their names and fields, and their async client stays theirs.
    """
    missing = [model for model in models if not _is_set_up(model)]
    if not missing:
        return
    failure: list[BaseException] = []

    async def set_up() -> None:
        millis = int(timeout * 1000)
        client = driver.client_for(uri, serverSelectionTimeoutMS=millis, connectTimeoutMS=millis, **options)
        try:
            await init_beanie(database=client[name], document_models=list(missing))
        finally:
            await driver.close_client(client)

    def run() -> None:
        try:
            asyncio.run(set_up())
        except BaseException as exc:
            failure.append(exc)

    # A thread of its own, so that init() works whether or not the caller runs an event loop.
    thread = threading.Thread(target=run, name="beanie-tasks-sync-init", daemon=True)
    thread.start()
    thread.join()
    if failure:
        error = failure[0]
        if isinstance(error, (ServerSelectionTimeoutError, OperationFailure)):
            raise error
        raise NotConfigured(f"beanie_tasks.sync.init(): {scrub(str(error), secrets)}") from error


def _is_set_up(model: type[Task]) -> bool:
    try:
        model.get_settings()
    except CollectionWasNotInitialized:
        return False
    return True
