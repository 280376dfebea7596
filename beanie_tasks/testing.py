"""Helpers for testing code that uses beanie-tasks: a server, a fresh database, a command counter.

Use the fixtures from your ``conftest.py``::

    from beanie_tasks.testing import mongodb_uri, task_database  # noqa: F401

``mongodb_uri`` is ``MONGODB_URI`` when set, else an embedded SecantusDB server
started once per test session (needs the ``server`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import pytest
from pymongo import monitoring

from beanie_tasks.driver import client_for, close_client
from beanie_tasks.embedded import EmbeddedServer
from beanie_tasks.worker import Worker

# Commands the driver sends on its own, which say nothing about an operation's cost.
BACKGROUND_COMMANDS = frozenset(
    {"hello", "ismaster", "isMaster", "ping", "endSessions", "saslStart", "saslContinue", "buildInfo", "killCursors"}
)


class CommandCounter(monitoring.CommandListener):
    """Counts the commands a client sends, by name, leaving out handshakes and heartbeats."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.last: dict[str, Mapping[str, Any]] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name not in BACKGROUND_COMMANDS:
            self.commands.append(event.command_name)
            self.last[event.command_name] = event.command

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def reset(self) -> None:
        self.commands.clear()
        self.last.clear()

    @property
    def total(self) -> int:
        return len(self.commands)

    def by_name(self) -> Counter[str]:
        return Counter(self.commands)


@pytest.fixture(scope="session")
def mongodb_uri() -> Iterator[str]:
    """A server for the whole session: ``MONGODB_URI``, else a fresh embedded SecantusDB."""
    configured = os.environ.get("MONGODB_URI")
    if configured:
        yield configured
        return
    with EmbeddedServer(ttl_sweep_seconds=1.0) as server:
        yield server.uri


@pytest.fixture
async def task_database(mongodb_uri: str) -> AsyncIterator[Any]:
    """A uniquely named database, dropped after the test."""
    client = client_for(mongodb_uri, serverSelectionTimeoutMS=10_000)
    name = f"bt_test_{uuid.uuid4().hex[:12]}"
    try:
        yield client[name]
    finally:
        await client.drop_database(name)
        await close_client(client)


async def eventually(probe: Callable[[], Awaitable[Any]], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Await ``probe()`` until it returns something truthy, and return that; fail after ``timeout`` seconds.

    Tests wait on conditions, never on a fixed sleep, so they stay correct on a slow machine.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = await probe()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@contextlib.asynccontextmanager
async def running(worker: Worker, *, stop_timeout: float = 20.0) -> AsyncIterator[Worker]:
    """Run ``worker`` in the background for the block, then stop it and wait for its drain."""
    stop = asyncio.Event()
    job = asyncio.create_task(worker.run(stop))
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(job, stop_timeout)
