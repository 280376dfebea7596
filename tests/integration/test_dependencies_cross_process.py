"""A dependency finished by a worker that never imported its dependents still releases them.

The worker process imports only the module of ``Parent`` (and initialises Beanie with
``Parent`` alone); the dependent ``Child`` lives in another module that only the
producer imports. Notification must be driven by what is stored on the Parent document,
not by which classes the finishing process happens to know.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from beanie import init_beanie

from beanie_tasks import State
from beanie_tasks.testing import eventually
from tests.conftest import Backend, stop_subprocess

PARENT_MODULE = """
from beanie_tasks import Task


class Parent(Task):
{settings}
    async def run(self) -> str:
        return "parent done"
"""

CHILD_MODULE = """
import warnings

from beanie import Link
from pydantic import Field

from beanie_tasks import DependencyType, Task
from {parent_module} import Parent

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)

    class Child(Task):
        parent: Link[Parent] = Field(dependency_type=DependencyType.DIRECT)

        async def run(self) -> str:
            return "child done"
"""

TTL_SETTINGS = "    class TaskSettings:\n        ttl = 1\n"


@dataclass
class Modules:
    parent_name: str
    parent: ModuleType
    child: ModuleType
    folder: Path


def write_modules(tmp_path: Path, settings: str) -> Iterator[Modules]:
    suffix = tmp_path.name.replace("-", "_")
    parent_name, child_name = f"bt_deps_a_{suffix}", f"bt_deps_b_{suffix}"
    (tmp_path / f"{parent_name}.py").write_text(PARENT_MODULE.format(settings=settings or "    pass\n"))
    (tmp_path / f"{child_name}.py").write_text(CHILD_MODULE.format(parent_module=parent_name))
    sys.path.insert(0, str(tmp_path))
    try:
        yield Modules(parent_name, importlib.import_module(parent_name), importlib.import_module(child_name), tmp_path)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(parent_name, None)
        sys.modules.pop(child_name, None)


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[Modules]:
    yield from write_modules(tmp_path, "")


@pytest.fixture
def expiring(tmp_path: Path) -> Iterator[Modules]:
    yield from write_modules(tmp_path, TTL_SETTINGS)


@contextlib.asynccontextmanager
async def parent_only_worker(backend: Backend, db: Any, modules: Modules) -> AsyncIterator[asyncio.subprocess.Process]:
    """A ``beanie-tasks worker`` process that imports the Parent module only (init_beanie with Parent alone)."""
    assert backend.uri is not None
    path = os.pathsep.join(filter(None, [str(modules.folder), os.environ.get("PYTHONPATH")]))
    log_path = modules.folder / "worker.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "beanie_tasks.cli", "worker", modules.parent_name,
            "--uri", backend.uri, "--database", db.name, "--no-schedules",
            cwd=modules.folder, env=os.environ | {"PYTHONPATH": path},
            stdout=asyncio.subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    try:
        yield process
    finally:
        await stop_subprocess(process)


async def pop_within(child_class: Any, seconds: float) -> Any:
    """Poll ``Child.pop()`` for up to ``seconds``; the claimed task or None."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        claimed = await child_class.pop()
        if claimed is not None or loop.time() >= deadline:
            return claimed
        await asyncio.sleep(0.05)


@pytest.mark.wire
async def test_child_released_by_a_worker_that_never_imported_it(backend: Backend, db: Any, plain: Modules) -> None:
    """Within 1 s of the Parent ending FINISHED in a Parent-only worker, the Child is claimable here,
    with no sweep, recovery or check_dependencies in this process."""
    parent_class, child_class = plain.parent.Parent, plain.child.Child
    await init_beanie(database=db, document_models=[parent_class, child_class])
    parent = await parent_class().push()
    child = await child_class(parent=parent).push()
    assert await child_class.pop() is None, "the Child waits for its Parent"

    async with parent_only_worker(backend, db, plain) as worker:

        async def parent_finished() -> bool:
            assert worker.returncode is None, (plain.folder / "worker.log").read_text()
            stored = await parent_class.get(parent.id)
            return stored is not None and stored.state is State.FINISHED and stored.finished_at is not None

        await eventually(parent_finished, timeout=30)
        claimed = await pop_within(child_class, 1.0)
        stored = await child_class.get(child.id)
        assert claimed is not None and claimed.id == child.id, (
            f"the Child was not released within 1 s of its Parent finishing "
            f"(it is {stored.state.value if stored else 'gone'}, run_at {stored.run_at if stored else None})"
        )


@pytest.mark.wire
async def test_child_released_although_the_parent_expires_at_once(backend: Backend, db: Any, expiring: Modules) -> None:
    """A Parent with ``ttl = 1`` finished by a Parent-only worker, then removed by the TTL monitor:
    the Child still becomes claimable, and is not FAILED as 'deleted before it ended'."""
    parent_class, child_class = expiring.parent.Parent, expiring.child.Child
    assert parent_class.task_options.ttl == 1
    await init_beanie(database=db, document_models=[parent_class, child_class])
    parent = await parent_class().push()
    child = await child_class(parent=parent).push()
    assert await child_class.pop() is None

    async with parent_only_worker(backend, db, expiring) as worker:

        async def parent_ended_or_gone() -> bool:
            assert worker.returncode is None, (expiring.folder / "worker.log").read_text()
            stored = await parent_class.get(parent.id)
            return stored is None or stored.state is State.FINISHED

        await eventually(parent_ended_or_gone, timeout=30)
        # The TTL monitor sweeps every second; give the Parent time to be removed as well.
        claimed = await pop_within(child_class, 5.0)
        stored = await child_class.get(child.id)
        assert stored is not None
        assert stored.state is not State.FAILED, f"the Child failed: {stored.error}"
        assert claimed is not None and claimed.id == child.id, (
            f"the Child never became claimable (it is {stored.state.value}, run_at {stored.run_at})"
        )
