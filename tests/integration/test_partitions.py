"""Partitioned queues (``TaskSettings.partition_by``).

A class partitioned by one of its fields keeps that field first in its claim and dedupe
indexes, and consumers can be pinned to partitions: ``pop(partition=...)``,
``Worker(..., partitions=[...])`` and ``beanie-tasks worker --partition``. A task of another
partition is never claimed; a task without a partition value is refused at push.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from beanie_tasks import PushError, State, Task, Worker
from beanie_tasks.testing import eventually, running
from tests.conftest import Backend, stop_subprocess

COLLECTION = "bt_tenanted"


@functools.cache
def tenanted() -> type[Task]:
    """The partitioned class, defined on first use so that a library without ``partition_by``
    fails each test with its own error instead of failing the whole module's import."""

    class Tenanted(Task):
        class Settings:
            name = COLLECTION

        class TaskSettings:
            partition_by = "tenant"

        tenant: str
        n: int = 0

        async def run(self) -> str:
            return f"{self.tenant}-{self.n}"

    return Tenanted


@pytest.fixture
async def cls(init_tasks: Any) -> type[Task]:
    task_class = tenanted()
    await init_tasks(task_class)
    return task_class


async def push_both(cls: Any) -> tuple[list[Any], list[Any]]:
    """Two tasks in partition "a" and two in "b"; the "b" ones first in claim order (higher priority)."""
    b_tasks = [await cls(tenant="b", n=n, priority=4).push() for n in range(2)]
    a_tasks = [await cls(tenant="a", n=n, priority=1).push() for n in range(2)]
    return a_tasks, b_tasks


async def states_of(cls: Any, tasks: list[Any]) -> list[State]:
    found = []
    for task in tasks:
        stored = await cls.get(task.id)
        assert stored is not None
        found.append(stored.state)
    return found


@pytest.mark.wire  # mongomock has no partial indexes: its dedupe index is on the slot alone (see driver.py)
async def test_claim_and_dedupe_indexes_lead_with_the_partition_field(cls: Any, backend: Backend) -> None:
    """After init_beanie, the bt_claim and bt_dedupe indexes have "tenant" as their first key."""
    indexes = await cls.collection().index_information()
    for name in ("bt_claim", "bt_dedupe"):
        assert name in indexes, sorted(indexes)
        assert indexes[name]["key"][0][0] == "tenant", (name, indexes[name]["key"])


async def test_pop_of_a_partition_claims_only_that_partition(cls: Any) -> None:
    """pop(partition="a") returns only tenant "a" tasks, and None once they are taken; the "b" tasks stay CREATED."""
    a_tasks, b_tasks = await push_both(cls)
    claimed = [await cls.pop(partition="a") for _ in range(2)]
    assert all(t is not None and t.tenant == "a" for t in claimed), claimed
    assert sorted(t.id for t in claimed) == sorted(t.id for t in a_tasks)
    assert await cls.pop(partition="a") is None
    assert await states_of(cls, b_tasks) == [State.CREATED, State.CREATED]


async def test_a_worker_pinned_to_a_partition_runs_only_it(cls: Any) -> None:
    """Worker([Tenanted], partitions=["a"]) finishes the "a" tasks and never claims the "b" ones,
    although they come first in claim order."""
    a_tasks, b_tasks = await push_both(cls)

    async def a_done() -> bool:
        return await states_of(cls, a_tasks) == [State.FINISHED, State.FINISHED]

    async with running(Worker([cls], partitions=["a"], concurrency=1)):
        await eventually(a_done, timeout=30)
    assert await states_of(cls, b_tasks) == [State.CREATED, State.CREATED]


async def test_a_task_without_a_partition_value_is_refused(cls: Any, db: Any) -> None:
    """Pushing a Tenanted whose tenant is empty raises (validation or PushError) and writes nothing."""
    with pytest.raises((PushError, ValidationError, ValueError)):
        await cls(tenant="", n=1).push()
    assert await cls.collection().count_documents({}) == 0


WORKER_MODULE = f"""
from beanie_tasks import Task


class Tenanted(Task):
    class Settings:
        name = {COLLECTION!r}

    class TaskSettings:
        partition_by = "tenant"

    tenant: str
    n: int = 0

    async def run(self) -> str:
        return f"{{self.tenant}}-{{self.n}}"
"""


@pytest.mark.wire
async def test_cli_worker_with_partition_runs_only_it(backend: Backend, db: Any, cls: Any, tmp_path: Path) -> None:
    """beanie-tasks worker MODULE --partition a finishes the "a" tasks and leaves the "b" tasks CREATED."""
    assert backend.uri is not None
    a_tasks, b_tasks = await push_both(cls)
    name = f"bt_partitions_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(WORKER_MODULE)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "beanie_tasks.cli", "worker", name, "--partition", "a"]
    command += ["--uri", backend.uri, "--database", db.name, "--concurrency", "1", "--no-schedules"]
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command, cwd=tmp_path, env=os.environ | {"PYTHONPATH": path}, stdout=asyncio.subprocess.DEVNULL, stderr=log
        )
    try:

        async def a_done() -> bool:
            assert process.returncode is None, f"the worker exited: {log_path.read_text()[-2000:]}"
            return await states_of(cls, a_tasks) == [State.FINISHED, State.FINISHED]

        await eventually(a_done, timeout=60)
    finally:
        await stop_subprocess(process)
    assert await states_of(cls, b_tasks) == [State.CREATED, State.CREATED]


@pytest.mark.wire
async def test_writes_to_one_task_carry_its_partition_value(cls: Any, backend: Backend) -> None:
    """Every guarded write of a partitioned task names its partition, so a collection sharded on the
    partition field routes finish, fail, cancel and heartbeats to one shard."""
    await cls(tenant="a").push()
    await cls(tenant="a").push()
    first = await cls.pop(partition="a")
    second = await cls.pop(partition="a")
    assert first is not None and second is not None
    backend.counter.reset()
    await first.heartbeat()
    assert backend.counter.last["update"]["updates"][0]["q"]["tenant"] == "a"
    await first.finish()
    assert backend.counter.last["findAndModify"]["query"]["tenant"] == "a"
    await second.cancel()
    assert backend.counter.last["findAndModify"]["query"]["tenant"] == "a"
