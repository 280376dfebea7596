"""beanie_tasks.sync.init: every configuration mistake is one clear line, without the password."""

from __future__ import annotations

from typing import Any

import pytest
from pymongo import MongoClient

import beanie_tasks.sync
from beanie_tasks import Task
from beanie_tasks.errors import NotConfigured
from tests.conftest import Backend


class Ping(Task):
    pass


class Pong(Task):
    pass


class NeverSetUp(Task):
    """Not given to init_beanie in this process: init() with a client sets it up."""


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> Any:
    await init_tasks(Ping, Pong)
    beanie_tasks.sync.close()
    yield
    beanie_tasks.sync.close()


def one_line(error: pytest.ExceptionInfo[NotConfigured]) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


async def test_push_sync_before_init_says_what_to_call() -> None:
    with pytest.raises(NotConfigured) as caught:
        Ping().push_sync()
    assert "beanie_tasks.sync.init(uri, document_models=[...])" in one_line(caught)


async def test_a_uri_without_a_database_is_refused_without_its_password() -> None:
    with pytest.raises(NotConfigured) as caught:
        beanie_tasks.sync.init("mongodb://ada:s3cret@127.0.0.1:1/?authSource=admin", document_models=[Ping])
    text = one_line(caught)
    assert "names no database" in text and "database=" in text and "s3cret" not in text


async def test_other_bad_arguments_are_refused() -> None:
    with pytest.raises(NotConfigured, match=r"takes a MongoDB URI naming the database .* or a pymongo\.MongoClient"):
        beanie_tasks.sync.init(42, document_models=[Ping])  # type: ignore[arg-type]
    with pytest.raises(NotConfigured, match="the client names no default database; pass database="):
        beanie_tasks.sync.init(MongoClient("mongodb://127.0.0.1:1", connect=False), document_models=[Ping])
    with pytest.raises(NotConfigured, match="must be Task subclasses"):
        beanie_tasks.sync.init("mongodb://127.0.0.1:1/db", document_models=[dict])  # type: ignore[list-item]
    with pytest.raises(NotConfigured, match="document_models is empty"):
        beanie_tasks.sync.init("mongodb://127.0.0.1:1/db", document_models=[])
    with pytest.raises(NotConfigured, match="invalid MongoDB URI"):
        beanie_tasks.sync.init("http://127.0.0.1/db", document_models=[Ping])


async def test_an_unreachable_server_is_one_line() -> None:
    with pytest.raises(NotConfigured) as caught:
        beanie_tasks.sync.init("mongodb://ada:s3cret@127.0.0.1:1/db", document_models=[Ping], timeout=0.3)
    text = one_line(caught)
    assert "cannot reach MongoDB" in text and "s3cret" not in text


@pytest.mark.wire
async def test_a_class_left_out_of_document_models_says_so(backend: Backend, db: Any) -> None:
    assert backend.uri is not None
    beanie_tasks.sync.init(backend.uri, document_models=[Ping], database=db.name)
    assert Ping().push_sync().id is not None
    with pytest.raises(NotConfigured) as caught:
        Pong().push_sync()
    assert "Pong is not in the document_models" in one_line(caught)


@pytest.mark.wire
async def test_the_apps_own_client_is_used_and_left_open(backend: Backend, db: Any) -> None:
    """An app that already has a pymongo.MongoClient hands it over: pushes go through it, classes
    the async side never set up are set up on the same servers, and close() leaves it open."""
    assert backend.uri is not None
    client: MongoClient[dict[str, Any]] = MongoClient(backend.uri)  # no tz_aware: the queue's reads still are
    try:
        beanie_tasks.sync.init(client, document_models=[Ping, NeverSetUp], database=db.name)
        pushed = Ping().push_sync()
        fresh = NeverSetUp().push_sync()
        assert client[db.name]["Ping"].find_one({"_id": pushed.id}) is not None
        assert client[db.name]["NeverSetUp"].find_one({"_id": fresh.id}) is not None
        beanie_tasks.sync.close()
        assert client.admin.command("ping")["ok"] == 1  # still open: it is the app's
    finally:
        client.close()
