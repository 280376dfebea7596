"""A Worker can be given the modules that define task classes instead of the classes."""

from __future__ import annotations

import asyncio
import importlib
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

from beanie_tasks import State, Task, Worker


@pytest.fixture
def task_module(tmp_path: Path) -> Any:
    name = f"bt_worker_module_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from beanie_tasks import Task

            class Square(Task):
                n: int

                async def run(self) -> int:
                    return self.n * self.n

            class PlainRecord(Task):  # no run(): a worker given the module leaves it alone
                note: str = ""
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield name
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


async def test_worker_takes_a_module_name_and_runs_its_classes(task_module: str, init_tasks: Any) -> None:
    module = importlib.import_module(task_module)
    await init_tasks(module.Square, module.PlainRecord)
    worker = Worker([task_module], concurrency=2)
    assert worker.task_classes == [module.Square]
    square = module.Square
    pushed = await square(n=7).push()
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        for _ in range(200):
            stored = await square.get(pushed.id)
            if stored is not None and stored.state is State.FINISHED:
                break
            await asyncio.sleep(0.05)
        assert stored is not None and stored.state is State.FINISHED and stored.result == 49
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)


class Echo(Task):
    async def run(self) -> str:
        return "echo"


async def test_module_objects_and_bad_modules(init_tasks: Any) -> None:
    await init_tasks(Echo)
    module = types.ModuleType("bt_inline_tasks")
    module.Echo = Echo  # type: ignore[attr-defined]
    assert Worker([module]).task_classes == [Echo]
    with pytest.raises(ValueError, match="no Task subclass with a run"):
        Worker([types.ModuleType("bt_empty_tasks")])
    with pytest.raises(LookupError, match="no module named"):
        Worker(["bt_no_such_module_anywhere"])
