"""Crash redelivery: a delivery lost with its worker is given back, by default, a bounded number of times.

Contract: ``TaskSettings.max_redeliveries`` (default 3) and a ``redeliveries`` field on the task
(default 0). Lease recovery hands back the attempt the lost delivery took, and counts a
redelivery instead; a task whose lease is lost ``max_redeliveries + 1`` times ends FAILED.
An explicit ``fail()`` still spends attempts as before (``max_attempts`` default 1).
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from workerkit import background, long_ago, until

from beanie_tasks import State, Task, Worker

TERMINAL = {State.FINISHED.value, State.FAILED.value, State.CANCELLED.value}
CRASH_MODULE = "bt_redelivery_tasks"
RUNS = "redelivery_runs"

# A task class with default retry settings, importable by a worker subprocess: BT_HANG=1 makes run() hang.
CRASH_SOURCE = textwrap.dedent(
    f"""
    from __future__ import annotations

    import asyncio
    import os
    from typing import Any

    from beanie_tasks import Task


    class Crashy(Task):
        n: int

        async def run(self) -> Any:
            runs = self.collection().database["{RUNS}"]
            await runs.insert_one({{"task": self.id, "pid": os.getpid(), "attempts": self.attempts}})
            if os.environ.get("BT_HANG") == "1":
                await asyncio.sleep(3600)  # SIGKILLed here by the test
            return {{"n": self.n}}

        class Settings:
            name = "redelivery_crashy"

        class TaskSettings:
            visibility_timeout = 2  # the only retry-related change: leases expire quickly
            recovery_interval = 0.3
            poll_interval = 0.1
    """
)

RUNNER_SOURCE = textwrap.dedent(
    f"""
    from __future__ import annotations

    import asyncio
    import sys

    from beanie import init_beanie

    from beanie_tasks.driver import client_for
    from beanie_tasks.worker import Worker
    from {CRASH_MODULE} import Crashy


    async def main(uri: str, database: str) -> None:
        client = client_for(uri, serverSelectionTimeoutMS=5000)
        await init_beanie(database=client[database], document_models=[Crashy])
        worker = Worker([Crashy], concurrency=1, consumer_id="victim", use_change_stream=False, schedules=False)
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(120, stop.set)
        await worker.run(stop)


    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def stored(task_class: type[Task], task_id: Any) -> dict[str, Any]:
    document = await task_class.collection().find_one({"_id": task_id})
    assert document is not None
    return dict(document)


def plain_class() -> type[Task]:
    class Plain(Task):
        """Default settings: max_attempts 1, max_redeliveries 3."""

        n: int = 0

        class Settings:
            name = "redelivery_plain"

    return Plain


def final_on_first_loss_class() -> type[Task]:
    class Fragile(Task):
        n: int = 0

        class Settings:
            name = "redelivery_fragile"

        class TaskSettings:
            max_redeliveries = 0

    return Fragile


async def lose_lease(task_class: type[Task], task_id: Any) -> dict[str, Any]:
    """Claim the task, let its lease expire as if its worker died, recover it; return the stored document."""
    task = await task_class.pop(consumer_id="doomed")
    assert task is not None and task.id == task_id, "the task is claimable again after each lost lease"
    await task_class.collection().update_one({"_id": task_id}, {"$set": {"lease_expires_at": long_ago()}})
    assert await task_class.recover_expired() == 1
    return await stored(task_class, task_id)


def start_victim(tmp_path: Path, uri: str, database: str) -> subprocess.Popen[bytes]:
    """A worker subprocess (in its own session, so the test can SIGKILL it) whose run() hangs."""
    environment = dict(os.environ, BT_HANG="1")
    environment["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])
    with open(tmp_path / "victim.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, str(tmp_path / "crash_runner.py"), uri, database],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.mark.wire
async def test_sigkilled_worker_task_is_redelivered_with_default_settings(
    backend: Any, db: Any, init_tasks: Callable[..., Awaitable[None]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is lost: with default settings, a run killed with its worker runs again and finishes.

    The lost delivery is counted in ``redeliveries`` and does not spend the only attempt.
    """
    (tmp_path / f"{CRASH_MODULE}.py").write_text(CRASH_SOURCE)
    (tmp_path / "crash_runner.py").write_text(RUNNER_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, CRASH_MODULE, raising=False)
    crashy: Any = importlib.import_module(CRASH_MODULE).Crashy
    await init_tasks(crashy)
    task = await crashy(n=7).push()
    runs = db[RUNS]

    victim = start_victim(tmp_path, backend.uri, db.name)
    try:

        async def victim_started() -> bool | str:
            if victim.poll() is not None:
                raise AssertionError(f"the victim exited early: {(tmp_path / 'victim.log').read_text()}")
            return await runs.count_documents({"task": task.id, "pid": victim.pid}) == 1 or "not started"

        await until(victim_started, timeout=30, what="the victim worker to start the task")
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(10)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(10)
    assert (await stored(crashy, task.id))["state"] == State.RUNNING.value  # held by a dead process

    worker = Worker([crashy], concurrency=1, consumer_id="survivor", use_change_stream=False, schedules=False)
    async with background(worker) as job:

        async def ended() -> bool | str:
            state = (await stored(crashy, task.id))["state"]
            return state in TERMINAL or state

        await until(ended, timeout=30, what="the killed task to end", job=job)
    after = await stored(crashy, task.id)
    assert after["state"] == State.FINISHED.value, f"ended {after['state']}: {after.get('error')}"
    assert after["result"] == {"n": 7}
    assert after.get("redeliveries") == 1 and after["attempts"] == 1
    assert await runs.count_documents({"task": task.id}) == 2


async def test_explicit_fail_with_default_settings_still_fails(init_tasks: Callable[..., Awaitable[None]]) -> None:
    """An explicit fail() spends the attempt (max_attempts default 1): FAILED, with no redelivery counted."""
    plain = plain_class()
    await init_tasks(plain)
    pushed = await plain().push()
    assert pushed.redeliveries == 0  # type: ignore[attr-defined]
    task = await plain.pop()
    assert task is not None
    await task.fail("x")
    after = await stored(plain, pushed.id)
    assert after["state"] == State.FAILED.value and after["error"] == "x"
    assert after["attempts"] == 1 and after.get("redeliveries") == 0


async def test_lease_lost_max_redeliveries_plus_one_times_ends_failed(
    init_tasks: Callable[..., Awaitable[None]],
) -> None:
    """Redelivery is bounded: the first ``max_redeliveries`` (3) lost leases redeliver, the 4th is final.

    Each recovery gives the lost attempt back; the final error names the lease and the 4 deliveries.
    """
    plain = plain_class()
    await init_tasks(plain)
    pushed = await plain().push()
    for lost in (1, 2, 3):
        after = await lose_lease(plain, pushed.id)
        assert after["state"] == State.CREATED.value, f"lost lease {lost}: {after['state']} ({after.get('error')})"
        assert after["attempts"] == 0 and after.get("redeliveries") == lost
    after = await lose_lease(plain, pushed.id)
    assert after["state"] == State.FAILED.value
    error = after.get("error") or ""
    assert "lease" in error and re.search(r"\b4\b", error), error


async def test_max_redeliveries_zero_makes_the_first_lost_lease_final(
    init_tasks: Callable[..., Awaitable[None]],
) -> None:
    """``max_redeliveries = 0`` opts out of redelivery: the first lost lease ends the task FAILED."""
    fragile = final_on_first_loss_class()
    await init_tasks(fragile)
    pushed = await fragile().push()
    after = await lose_lease(fragile, pushed.id)
    assert after["state"] == State.FAILED.value and "lease" in (after.get("error") or "")
