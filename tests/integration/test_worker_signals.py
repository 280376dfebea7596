"""Graceful shutdown of a real worker process: SIGTERM drains and releases; a second signal exits at once."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from beanie import init_beanie

from beanie_tasks import State, Task
from beanie_tasks.testing import eventually as wait_until

pytestmark = pytest.mark.wire

WORKER_SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, sys
    from beanie import init_beanie
    from beanie_tasks import Task, Worker
    from beanie_tasks.driver import client_for

    class Sleeper(Task):
        seconds: float

        class TaskSettings:
            visibility_timeout = 2.0
            heartbeat_interval = 0.3
            max_attempts = 2

        async def run(self) -> float:
            await asyncio.sleep(self.seconds)
            return self.seconds

    async def main() -> None:
        logging.basicConfig(level=logging.INFO)
        client = client_for(sys.argv[1])
        await init_beanie(database=client[sys.argv[2]], document_models=[Sleeper])
        worker = Worker([Sleeper], concurrency=4, grace_period=float(sys.argv[3]))
        worker.install_signal_handlers()
        await worker.run()

    asyncio.run(main())
    """
)


class Sleeper(Task):
    seconds: float

    class TaskSettings:
        visibility_timeout = 2.0
        max_attempts = 2


async def eventually(probe: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    return await wait_until(probe, timeout)


@pytest.fixture
async def models(db: Any) -> None:
    await init_beanie(database=db, document_models=[Sleeper])


@pytest.fixture
def start_worker(backend: Any, db: Any) -> Iterator[Callable[[float], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(grace_period: float) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-c", WORKER_SCRIPT, backend.uri, db.name, str(grace_period)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


async def exit_code(process: subprocess.Popen[bytes], timeout: float) -> int:
    code = await eventually(lambda: _async(process.poll() is not None), timeout=timeout)
    assert code
    return int(process.returncode)


async def state_of(task: Sleeper) -> Sleeper:
    stored = await Sleeper.get(task.id)
    assert stored is not None
    return stored


async def test_sigterm_drains_finishes_short_tasks_and_releases_long_ones(
    models: None, start_worker: Callable[[float], subprocess.Popen[bytes]]
) -> None:
    short = await Sleeper(seconds=1.0).push()
    long = await Sleeper(seconds=60).push()
    process = start_worker(3.0)
    for task in (short, long):
        await eventually(lambda task=task: _is(state_of(task), State.RUNNING))
    later = await Sleeper(seconds=0).push(delay=1.0)  # becomes ready only after the signal
    process.send_signal(signal.SIGTERM)
    assert await exit_code(process, timeout=30) == 0, process.stdout.read().decode() if process.stdout else ""
    output = process.stdout.read().decode() if process.stdout else ""
    assert "SIGTERM: stopping claims" in output
    finished = await state_of(short)
    assert finished.state is State.FINISHED and finished.result == 1.0
    released = await state_of(long)
    assert released.state is State.CREATED and released.attempts == 0 and released.lease_token is None
    untouched = await state_of(later)
    assert untouched.state is State.CREATED and untouched.attempts == 0


async def test_second_signal_exits_at_once_and_the_lease_is_recovered_later(
    models: None, start_worker: Callable[[float], subprocess.Popen[bytes]]
) -> None:
    long = await Sleeper(seconds=60).push()
    process = start_worker(60.0)
    await eventually(lambda: _is(state_of(long), State.RUNNING))
    process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    assert process.poll() is None  # draining: the grace period is a minute
    process.send_signal(signal.SIGTERM)
    assert await exit_code(process, timeout=10) == 128 + signal.SIGTERM
    output = process.stdout.read().decode() if process.stdout else ""
    assert "again: exiting now" in output
    held = await state_of(long)
    assert held.state is State.RUNNING and held.attempts == 1  # nothing was written on the way out
    await eventually(lambda: Sleeper.recover_expired(), timeout=10)
    recovered = await state_of(long)
    # Delivered again: the lost run costs a redelivery, and its attempt is given back.
    assert recovered.state is State.CREATED and recovered.attempts == 0 and recovered.redeliveries == 1


async def _is(stored: Awaitable[Sleeper], state: State) -> bool:
    return (await stored).state is state


async def _async(value: Any) -> Any:
    return value
