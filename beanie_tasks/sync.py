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
from collections.abc import Callable, Sequence
from typing import Any

from beanie import init_beanie
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import ConfigurationError, OperationFailure, PyMongoError, ServerSelectionTimeoutError

from beanie_tasks import driver
from beanie_tasks import store as storage
from beanie_tasks.errors import NotConfigured
from beanie_tasks.redact import redact_uri, scrub, secrets_in
from beanie_tasks.task import Task

__all__ = ["close", "init"]

_client: MongoClient[dict[str, Any]] | None = None
_owned = False  # whether close() closes _client (made from a URI) or leaves it (the app's own)
_lock = threading.Lock()


def init(
    uri_or_client: str | MongoClient[dict[str, Any]],
    document_models: Sequence[type[Task]],
    *,
    database: str | None = None,
    timeout: float = 10.0,
    **client_options: Any,
) -> None:
    """Set up ``push_sync`` / ``wait_sync`` for ``document_models`` on the database ``uri_or_client`` names.

    Give a URI (its path names the database, as for the CLI) or the app's own
    ``pymongo.MongoClient`` (its default database, or ``database=``; ``close()`` leaves an
    app's client open). ``database`` overrides the database; ``client_options`` (TLS,
    auth, pool sizes...) go to the ``pymongo.MongoClient`` made from a URI. Calling it
    again replaces the previous set-up. Every mistake is one ``NotConfigured`` line,
    without the password.
    """
    if isinstance(uri_or_client, MongoClient):
        _init_with_client(uri_or_client, document_models, database=database, timeout=timeout)
        return
    uri = uri_or_client
    if not isinstance(uri, str):
        raise NotConfigured(
            "beanie_tasks.sync.init() takes a MongoDB URI naming the database (mongodb://host/DBNAME) "
            f"or a pymongo.MongoClient, not a {type(uri).__name__}"
        )
    models = _checked_models(document_models)
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

        def async_client() -> Any:
            millis = int(timeout * 1000)
            return driver.client_for(uri, serverSelectionTimeoutMS=millis, connectTimeoutMS=millis, **client_options)

        _install(
            client, client[name], models, async_client, secrets, where=redact_uri(uri), timeout=timeout, owned=True
        )
    except BaseException:
        client.close()
        raise


def _init_with_client(
    client: MongoClient[dict[str, Any]], document_models: Sequence[type[Task]], *, database: str | None, timeout: float
) -> None:
    """``init`` with the app's own sync client: its servers and settings, left open by ``close()``."""
    models = _checked_models(document_models)
    try:
        name = client.get_default_database(database).name
    except ConfigurationError:
        raise NotConfigured(
            "beanie_tasks.sync.init(): the client names no default database; pass database= "
            "(or create the client from a URI whose path names one)"
        ) from None

    def async_client() -> Any:
        millis = int(timeout * 1000)
        try:
            return driver.async_twin_of(client, serverSelectionTimeoutMS=millis, connectTimeoutMS=millis)
        except TypeError as exc:
            raise NotConfigured(f"beanie_tasks.sync.init(): {exc}") from None

    # Dates come back aware whatever the app's client was made with, as the queue compares them.
    tasks_database = client.get_database(name, codec_options=client.codec_options.with_options(tz_aware=True))
    _install(client, tasks_database, models, async_client, [], where=f"database {name!r}", timeout=timeout, owned=False)


def _checked_models(document_models: Sequence[type[Task]]) -> list[type[Task]]:
    models = list(document_models)
    for model in models:
        if not (isinstance(model, type) and issubclass(model, Task)):
            raise NotConfigured(f"beanie_tasks.sync.init(): document_models must be Task subclasses, got {model!r}")
    if not models:
        raise NotConfigured("beanie_tasks.sync.init(): document_models is empty; name the task classes to push")
    return models


def _install(
    client: MongoClient[dict[str, Any]],
    tasks_database: Database[dict[str, Any]],
    models: list[type[Task]],
    async_client: Callable[[], Any],
    secrets: list[str],
    *,
    where: str,
    timeout: float,
    owned: bool,
) -> None:
    """Set the classes up, build their sync stores and indexes, then make this set-up the current one."""
    try:
        _set_up_models(tasks_database.name, models, async_client, secrets)
        stores = {
            model: storage.SyncStore(model.new_store(tasks_database[model.get_collection_name()])) for model in models
        }
        next(iter(stores.values())).measure_clock()
        for sync_store in stores.values():
            sync_store.ensure_indexes()
    except ServerSelectionTimeoutError:
        raise NotConfigured(f"beanie_tasks.sync.init(): cannot reach MongoDB at {where} within {timeout:g} s") from None
    except OperationFailure as exc:
        if exc.code == 18:
            raise NotConfigured(f"beanie_tasks.sync.init(): authentication failed for {where}") from None
        raise NotConfigured(f"beanie_tasks.sync.init(): MongoDB refused: {scrub(str(exc), secrets)}") from None
    global _client, _owned
    with _lock:
        previous, previous_owned = _client, _owned
        _client, _owned = client, owned
        storage.forget_sync()
        for model, sync_store in stores.items():
            storage.register_sync(model, sync_store)
    if previous is not None and previous_owned and previous is not client:
        previous.close()


def close() -> None:
    """Forget the set-up; a client made from a URI is closed (an app's own client stays open)."""
    global _client, _owned
    with _lock:
        previous, owned = _client, _owned
        _client, _owned = None, False
        storage.forget_sync()
    if previous is not None and owned:
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


def _set_up_models(name: str, models: list[type[Task]], async_client: Callable[[], Any], secrets: list[str]) -> None:
    """Run ``init_beanie`` for the classes Beanie has not set up in this process yet.

    Classes an async part of the app already set up are left alone: the sync producer
    only needs their names and fields, and their async client stays theirs.
    """
    missing = [model for model in models if not _is_set_up(model)]
    if not missing:
        return
    failure: list[BaseException] = []

    async def set_up() -> None:
        client = async_client()
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
        if isinstance(error, (ServerSelectionTimeoutError, OperationFailure, NotConfigured)):
            raise error
        raise NotConfigured(f"beanie_tasks.sync.init(): {scrub(str(error), secrets)}") from error


def _is_set_up(model: type[Task]) -> bool:
    """Whether ``init_beanie`` set up this very class (a subclass inherits its parent's Beanie settings)."""
    return storage.is_registered(model)
