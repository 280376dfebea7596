"""Credentials never leak into errors or logs; TLS and auth options reach the driver unchanged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from beanie import init_beanie
from fault_tasks import Job

from beanie_tasks import PushError
from beanie_tasks.driver import BEANIE_MAJOR, client_for, close_client
from beanie_tasks.embedded import EmbeddedServer

PASSWORD = "s3cr#t-pa55"
QUOTED = "s3cr%23t-pa55"


def driver_options(client: Any) -> dict[str, Any]:
    options = (client if BEANIE_MAJOR >= 2 else client.delegate).options  # Motor wraps a PyMongo client
    return dict(options._options)


def test_tls_and_auth_options_pass_through_unchanged() -> None:
    given = {
        "tls": True,
        "tlsAllowInvalidCertificates": True,
        "authSource": "admin",
        "authMechanism": "SCRAM-SHA-256",
        "appname": "billing-worker",
    }
    client = client_for(f"mongodb://alice:{QUOTED}@127.0.0.1:9/?replicaSet=rs0", **given)
    options = {name.lower(): value for name, value in driver_options(client).items()}
    for name, value in given.items():
        assert options[name.lower()] == value, name
    assert options["replicaset"] == "rs0"
    assert PASSWORD not in repr(client) and QUOTED not in repr(client)


def test_a_rejected_uri_is_reported_without_its_password() -> None:
    with pytest.raises(Exception) as raised:
        client_for(f"mongodb://alice:{QUOTED}@db.example.com:notaport/")
    assert QUOTED not in str(raised.value) and PASSWORD not in str(raised.value)


# ------------------------------------------------------------------ a server with a user


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(storage_path=str(tmp_path / "data")) as running:
        yield running


@pytest.fixture
async def authenticated(server: EmbeddedServer) -> AsyncIterator[str]:
    admin = client_for(server.uri)
    await admin.admin.command({"createUser": "alice", "pwd": PASSWORD, "roles": ["root"]})
    await close_client(admin)
    uri = f"mongodb://alice:{QUOTED}@{server.host}:{server.port}/?directConnection=true&authSource=admin"
    client = client_for(uri, serverSelectionTimeoutMS=800)
    await init_beanie(database=client["bt_safety"], document_models=[Job])
    yield uri
    await close_client(client)


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text and QUOTED not in text, text


@pytest.mark.wire
async def test_errors_and_logs_of_an_outage_carry_no_credentials(
    server: EmbeddedServer, authenticated: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await Job(n=1).push()  # authenticated and working
    server.stop()
    with pytest.raises(PushError) as raised:
        await Job(n=2).push()
    assert_no_secret(str(raised.value), repr(raised.value), str(raised.value.__cause__))

    stop = asyncio.Event()

    async def consume() -> None:
        async for _task in Job.queue(stop=stop, use_change_stream=False):
            pass

    consumer = asyncio.create_task(consume())
    for _ in range(100):  # bounded: until the consumer has reported the outage
        if any("lost the server" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(consumer, 10)
    assert any("lost the server" in r.getMessage() for r in caplog.records)
    assert_no_secret(caplog.text)


@pytest.mark.wire
async def test_wrong_password_is_reported_without_it(server: EmbeddedServer, authenticated: str) -> None:
    wrong = authenticated.replace(QUOTED, "wr0ng-pa55")
    client = client_for(wrong, serverSelectionTimeoutMS=800)
    try:
        with pytest.raises(Exception) as raised:
            await client["bt_safety"]["fault_jobs"].insert_one({"n": 1})
        assert "wr0ng-pa55" not in str(raised.value)
    finally:
        await close_client(client)
