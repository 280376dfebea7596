"""The worker registry: each running worker keeps one small document fresh, at most once per heartbeat interval."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest
from beanie import init_beanie
from pymongo import monitoring

from beanie_tasks import Task, Worker
from beanie_tasks.driver import close_client
from beanie_tasks.store import WORKERS_COLLECTION
from beanie_tasks.testing import CommandCounter, eventually, running
from tests.conftest import Backend

INTERVAL = 0.5


class Beat(Task):
    class TaskSettings:
        heartbeat_interval = INTERVAL
        visibility_timeout = 5

    async def run(self) -> None:
        pass


class RegistryWrites(CommandCounter):
    """Counts only the writes to the worker registry."""

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "update" and event.command.get("update") == WORKERS_COLLECTION:
            super().started(event)


async def test_worker_keeps_its_entry_and_removes_it_when_stopped(db: Any, init_tasks: Any) -> None:
    await init_tasks(Beat)
    registry = db[WORKERS_COLLECTION]
    worker = Worker([Beat], concurrency=3, consumer_id="reg-1")
    async with running(worker):
        entry = await eventually(lambda: registry.find_one({"_id": "reg-1"}))
        assert entry["host"] == socket.gethostname() and entry["pid"] == os.getpid()
        assert entry["concurrency"] == 3 and entry["classes"] == ["Beat"]
        assert entry["expires_at"] > entry["seen_at"] >= entry["started_at"]
        first_seen = entry["seen_at"]
        refreshed = await eventually(lambda: registry.find_one({"_id": "reg-1", "seen_at": {"$gt": first_seen}}))
        assert refreshed["started_at"] == entry["started_at"]
    assert await registry.find_one({"_id": "reg-1"}) is None
    await asyncio.sleep(INTERVAL * 3)
    assert await registry.find_one({"_id": "reg-1"}) is None, "a stopped worker refreshed its entry"
    assert "bt_worker_expiry" in await registry.index_information()


@pytest.mark.wire
async def test_registry_is_written_at_most_once_per_interval(backend: Backend, db: Any) -> None:
    writes = RegistryWrites()
    client = backend.client(event_listeners=[writes])
    try:
        await init_beanie(database=client[db.name], document_models=[Beat])
        worker = Worker([Beat], consumer_id="reg-2")
        loop = asyncio.get_running_loop()
        async with running(worker):
            await eventually(lambda: asyncio.sleep(0, result=writes.total >= 1))
            started = loop.time()
            writes.reset()
            await asyncio.sleep(INTERVAL * 6)
            elapsed = loop.time() - started
            count = writes.total
        assert 2 <= count <= elapsed / INTERVAL + 1, (count, elapsed)
    finally:
        await close_client(client)
