"""Times that decide due dates and leases come from the server's clock, not the client's.

The library reads wall time only through ``beanie_tasks.clock.local_now()`` and measures
the server's offset from it for each client at ``init_beanie``. A client whose own
clock runs 5 minutes fast must therefore neither claim a task early nor take a live
lease for an expired one, and it warns that its clock is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from beanie import init_beanie

from beanie_tasks import State, Task, clock
from beanie_tasks.driver import close_client
from beanie_tasks.testing import eventually
from tests.conftest import Backend

SKEW = timedelta(minutes=5)


class Tick(Task):
    n: int = 0

    async def run(self) -> int:
        return self.n


def real_now() -> datetime:
    return datetime.now(timezone.utc)


def skew_local_clock(monkeypatch: pytest.MonkeyPatch, offset: timedelta) -> None:
    """Make this process's wall clock run ``offset`` ahead of the real (and the server's) time.

    ``beanie_tasks.clock.local_now`` is the only place the library reads the wall clock.
    """

    def skewed() -> datetime:
        return real_now() + offset

    monkeypatch.setattr(clock, "local_now", skewed)


@pytest.fixture
async def init_on_new_client(backend: Backend, db: Any) -> AsyncIterator[Callable[[], Any]]:
    """``await init_on_new_client()``: a new client on the same database, with init_beanie run on it."""
    clients: list[Any] = []

    async def _init() -> Any:
        client = backend.client()
        clients.append(client)
        await init_beanie(database=client[db.name], document_models=[Tick])
        return client

    yield _init
    for client in clients:
        await close_client(client)


@pytest.mark.wire
async def test_a_fast_client_clock_does_not_claim_a_task_early(
    init_tasks: Any, monkeypatch: pytest.MonkeyPatch, init_on_new_client: Callable[[], Any]
) -> None:
    """A task pushed with delay=30 is not due by the server's clock: a client 5 minutes fast
    (initialised after its clock jumped) does not claim it."""
    await init_tasks(Tick)
    pushed = await Tick(n=1).push(delay=30)
    skew_local_clock(monkeypatch, SKEW)
    await init_on_new_client()
    claimed = await Tick.pop()
    assert claimed is None, "a client whose clock is 5 minutes fast claimed a task due in 30 s"
    stored = await Tick.get(pushed.id)
    assert stored is not None and stored.state is State.CREATED and stored.attempts == 0


@pytest.mark.wire
async def test_a_fast_client_clock_does_not_recover_a_live_lease(
    init_tasks: Any, monkeypatch: pytest.MonkeyPatch, init_on_new_client: Callable[[], Any]
) -> None:
    """A task claimed with the default 60 s lease: recover_expired() on a client 5 minutes fast
    returns 0 and the task stays RUNNING under its lease."""
    await init_tasks(Tick)
    await Tick(n=2).push()
    held = await Tick.pop()
    assert held is not None and held.lease_token is not None
    skew_local_clock(monkeypatch, SKEW)
    await init_on_new_client()
    assert await Tick.recover_expired() == 0, "a skewed client recovered a live lease"
    stored = await Tick.get(held.id)
    assert stored is not None and stored.state is State.RUNNING and stored.lease_token == held.lease_token


@pytest.mark.wire
async def test_a_large_clock_offset_is_reported(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, init_on_new_client: Callable[[], Any]
) -> None:
    """init_beanie with a client whose clock is 5 minutes off logs a WARNING, from a beanie_tasks logger,
    that mentions the clock (a first claim is allowed to be where the offset is noticed)."""
    skew_local_clock(monkeypatch, SKEW)
    with caplog.at_level(logging.WARNING, logger="beanie_tasks"):
        await init_on_new_client()
        assert await Tick.pop() is None
    warnings = [r for r in caplog.records if r.name.startswith("beanie_tasks") and r.levelno >= logging.WARNING]
    assert any("clock" in r.getMessage().lower() for r in warnings), [r.getMessage() for r in warnings]


# ---------------------------------------------------------------- a skewed worker process

WORKER_MODULE = """
from beanie_tasks import Task


class Tick(Task):
    n: int = 0

    async def run(self) -> int:
        return self.n
"""

FAKETIME = shutil.which("faketime")


def faked_env() -> dict[str, str]:
    return os.environ | {"FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def faketime_skew_seconds() -> float:
    """How far ahead ``faketime -f +5m`` puts a Python process's wall clock (0 if it has no effect)."""
    assert FAKETIME is not None
    probe = "import time; print(time.time())"
    out = subprocess.run(
        [FAKETIME, "-f", "+5m", sys.executable, "-c", probe],
        env=faked_env(), capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return float(out.stdout.strip()) - real_now().timestamp()


@pytest.mark.wire
@pytest.mark.skipif(FAKETIME is None, reason="needs the faketime tool (Debian package faketime) to skew a worker")
async def test_a_worker_with_a_fast_clock_leaves_a_live_lease_alone(
    backend: Backend, db: Any, init_tasks: Any, tmp_path: Path
) -> None:
    """A worker process running 5 minutes fast (faketime) does not recover a task this process holds
    under a live 60 s lease, for at least 3 s after it is up and running tasks."""
    assert FAKETIME is not None and backend.uri is not None
    skew = faketime_skew_seconds()
    if abs(skew - SKEW.total_seconds()) > 30:
        pytest.skip(f"faketime -f +5m skewed a Python process by {skew:.0f} s, not 300 s")
    await init_tasks(Tick)
    await Tick(n=1).push()
    held = await Tick.pop()
    assert held is not None and held.lease_token is not None
    sentinel = await Tick(n=2).push()

    name = f"bt_clock_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(WORKER_MODULE)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    command = [FAKETIME, "-f", "+5m", sys.executable, "-m", "beanie_tasks.cli", "worker", name]
    command += ["--uri", backend.uri, "--database", db.name, "--no-schedules", "--grace-period", "1"]
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=tmp_path,
            env=faked_env() | {"PYTHONPATH": path},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,  # faketime forks: signal the whole group, so the worker goes too
        )
    try:

        async def sentinel_finished() -> bool:
            assert process.returncode is None, log_path.read_text()
            stored = await Tick.get(sentinel.id)
            return stored is not None and stored.state is State.FINISHED

        # The worker recovers expired leases before its first claim: once it ran the sentinel, it has looked.
        await eventually(sentinel_finished, timeout=60)
        loop = asyncio.get_running_loop()
        watch_until = loop.time() + 3.0
        while loop.time() < watch_until:
            stored = await Tick.get(held.id)
            assert stored is not None
            assert stored.state is State.RUNNING and stored.lease_token == held.lease_token, (
                f"the skewed worker took over a live lease: the task is {stored.state.value}, "
                f"attempts {stored.attempts}, error {stored.error!r}"
            )
            await asyncio.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(process.wait(), timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
