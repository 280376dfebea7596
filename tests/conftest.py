"""Backends for the suite: mongomock (Beanie 1 only), SecantusDB, and MONGODB_URI when set.

A test that takes ``db`` runs once per available backend. Mark it ``wire`` when it
needs a real wire-protocol server (change streams, TTL, several processes).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from beanie import init_beanie

from beanie_tasks.driver import BEANIE_MAJOR, client_for, close_client
from beanie_tasks.embedded import EmbeddedServer
from beanie_tasks.testing import CommandCounter


def available_backends() -> list[str]:
    names = []
    if BEANIE_MAJOR < 2 and importlib.util.find_spec("mongomock_motor") is not None:
        names.append("mongomock")
    names.append("secantus")
    if os.environ.get("MONGODB_URI"):
        names.append("mongodb")
    return names


WIRE_BACKENDS = ("secantus", "mongodb")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        names = available_backends()
        if metafunc.definition.get_closest_marker("wire"):
            names = [n for n in names if n in WIRE_BACKENDS]
        metafunc.parametrize("backend", names, indirect=True)


@pytest.fixture(scope="session")
def secantus() -> Iterator[EmbeddedServer]:
    """One embedded server for the session; TTL sweeps every second so expiry is testable."""
    with EmbeddedServer(ttl_sweep_seconds=1.0, enable_test_commands=True) as server:
        yield server


@dataclass
class Backend:
    name: str
    uri: str | None
    counter: CommandCounter

    @property
    def is_mock(self) -> bool:
        return self.uri is None

    def client(self, **options: Any) -> Any:
        """A new client on this backend (mongomock shares one in-process store per client)."""
        if self.uri is None:
            from mongomock_motor import AsyncMongoMockClient

            return AsyncMongoMockClient(tz_aware=True)
        options.setdefault("serverSelectionTimeoutMS", 10_000)
        return client_for(self.uri, **options)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Backend:
    name = request.param
    counter = CommandCounter()
    if name == "mongomock":
        return Backend(name, None, counter)
    if name == "secantus":
        server = request.getfixturevalue("secantus")
        return Backend(name, server.uri, counter)
    return Backend(name, os.environ["MONGODB_URI"], counter)


@pytest.fixture
async def db(backend: Backend) -> AsyncIterator[Any]:
    """A fresh database on the backend, watched by ``backend.counter``, dropped afterwards."""
    client = backend.client(event_listeners=[backend.counter]) if not backend.is_mock else backend.client()
    name = f"bt_{uuid.uuid4().hex[:12]}"
    database = client[name]
    try:
        yield database
    finally:
        await client.drop_database(name)
        await close_client(client)


async def stop_subprocess(process: asyncio.subprocess.Process, timeout: float = 30.0) -> None:
    """SIGTERM a worker subprocess (it drains), and SIGKILL it if it has not exited within ``timeout``."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout=timeout)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()


@pytest.fixture
def init_tasks(db: Any) -> Callable[..., Awaitable[None]]:
    """``await init_tasks(ModelA, ModelB)``: a plain init_beanie on the test's database."""

    async def _init(*models: type) -> None:
        await init_beanie(database=db, document_models=list(models))

    return _init
