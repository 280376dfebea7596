"""``beanie-tasks worker`` as a real process: it runs the module's tasks and its schedules, and exits on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from beanie_tasks import State, Task


class WorkerEmail(Task):
    to: str

    async def run(self) -> str:
        return f"sent to {self.to}"


class WorkerTick(Task):
    class TaskSettings:
        every = 1

    async def run(self) -> str:
        return "tick"


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@pytest.mark.wire
async def test_worker_runs_tasks_and_schedules_then_exits_on_sigterm(backend: Any, db: Any, init_tasks: Any) -> None:
    await init_tasks(WorkerEmail, WorkerTick)
    pushed = [await WorkerEmail(to=f"user{i}").push() for i in range(3)]

    # The worker imports the task classes from this very file, as it would a user's module.
    here = Path(__file__)
    path = os.pathsep.join(filter(None, [str(here.parent), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"MONGODB_URI": backend.uri, "MONGODB_DATABASE": db.name, "PYTHONPATH": path}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "beanie_tasks.cli", "worker", here.stem, "--concurrency", "2",
        cwd=here.parent, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:

        async def all_done() -> bool:
            finished = await WorkerEmail.find({"state": State.FINISHED.value}).count()
            ticks = await WorkerTick.find({"state": State.FINISHED.value}).count()
            return finished == len(pushed) and ticks >= 1

        await eventually(all_done, timeout=60, what="the worker to run the pushed and the periodic tasks")
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    log = stderr.decode()
    assert process.returncode == 0, log[-3000:]
    assert "SIGTERM" in log and "Traceback" not in log
    done = await WorkerEmail.get(pushed[0].id)
    assert done is not None and done.result == "sent to user0"
