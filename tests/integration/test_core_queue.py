"""Queue(): stops cleanly, waits quietly when idle, and picks up a push well under a second."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from beanie_tasks import State, Task
from beanie_tasks.wakeup import Wakeup
from tests.conftest import Backend

IDLE_WINDOW = 1.0  # seconds of idleness whose commands are counted


class Ping(Task):
    n: int = 0


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Ping)


class Consumer:
    """Runs ``Ping.queue()`` in the background and records when each task arrives."""

    def __init__(self, *, use_change_stream: bool = True) -> None:
        self.stop = asyncio.Event()
        self.received: asyncio.Queue[tuple[float, Ping]] = asyncio.Queue()
        self.use_change_stream = use_change_stream
        self.runner: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        async for task in Ping.queue(stop=self.stop, use_change_stream=self.use_change_stream):
            await task.finish()
            await self.received.put((loop.time(), task))

    async def __aenter__(self) -> Consumer:
        self.runner = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.runner is not None
        await asyncio.wait_for(self.runner, timeout=10)


async def settle(consumer: Consumer) -> None:
    """Let the consumer reach its idle state (first claim attempt, stream opened, backoff grown)."""
    assert consumer.runner is not None
    await asyncio.sleep(1.5)
    assert not consumer.runner.done()


async def test_break_stops_the_queue_and_leaves_the_rest() -> None:
    for n in range(3):
        await Ping(n=n).push()
    seen = []
    async with contextlib.aclosing(Ping.queue()) as queue:
        async for task in queue:
            seen.append(task.n)
            await task.finish()
            break
    assert seen == [0]
    counts = await Ping.counts()
    assert counts[State.FINISHED] == 1 and counts[State.CREATED] == 2 and counts[State.RUNNING] == 0


async def test_plain_break_without_aclosing_also_stops() -> None:
    await Ping(n=1).push()
    await Ping(n=2).push()
    async for task in Ping.queue():
        await task.finish()
        break
    assert (await Ping.counts())[State.CREATED] == 1


async def test_stop_event_ends_an_idle_queue() -> None:
    async with Consumer() as consumer:
        await settle(consumer)
        consumer.stop.set()
        assert consumer.runner is not None
        await asyncio.wait_for(consumer.runner, timeout=5)


async def test_stop_event_set_before_start_yields_nothing() -> None:
    await Ping().push()
    stop = asyncio.Event()
    stop.set()
    assert [t async for t in Ping.queue(stop=stop)] == []
    assert (await Ping.counts())[State.CREATED] == 1


async def pickup_latency(consumer: Consumer) -> float:
    await settle(consumer)
    loop = asyncio.get_running_loop()
    pushed_at = loop.time()
    await Ping(n=7).push()
    arrived_at, task = await asyncio.wait_for(consumer.received.get(), timeout=10)
    assert task.n == 7
    return arrived_at - pushed_at


async def test_polling_picks_up_a_push_well_under_a_second() -> None:
    async with Consumer(use_change_stream=False) as consumer:
        assert await pickup_latency(consumer) < 1.0


@pytest.mark.wire
async def test_change_stream_picks_up_a_push_well_under_a_second() -> None:
    async with Consumer() as consumer:
        assert await pickup_latency(consumer) < 1.0


@pytest.mark.wire
async def test_change_stream_wakes_a_waiter_long_before_its_timeout() -> None:
    async with Wakeup(Ping.collection(), idle_timeout=60) as wakeup:
        assert wakeup.streaming
        waiting = asyncio.create_task(wakeup.wait())
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await Ping().push()
        await asyncio.wait_for(waiting, timeout=5)


async def idle_commands(backend: Backend, consumer: Consumer) -> dict[str, int]:
    await settle(consumer)
    backend.counter.reset()
    await asyncio.sleep(IDLE_WINDOW)  # measuring how much an idle queue talks, not waiting on a condition
    return dict(backend.counter.by_name())


@pytest.mark.wire
async def test_an_idle_polling_queue_does_not_spin(backend: Backend) -> None:
    async with Consumer(use_change_stream=False) as consumer:
        commands = await idle_commands(backend, consumer)
    # Backoff has grown to poll_interval (0.5s): about two claim attempts a second.
    assert sum(commands.values()) <= 6, commands


@pytest.mark.wire
async def test_an_idle_change_stream_queue_is_near_silent(backend: Backend) -> None:
    async with Consumer() as consumer:
        commands = await idle_commands(backend, consumer)
    commands.pop("getMore", None)
    # At most one claim attempt per idle_timeout (1s), to notice delayed tasks coming due.
    assert sum(commands.values()) <= 3, commands


async def test_delayed_task_is_yielded_when_due() -> None:
    await Ping(n=3).push(delay=0.5)

    async def first() -> Ping:
        async for task in Ping.queue():
            return task
        raise AssertionError("queue ended")

    task = await asyncio.wait_for(first(), timeout=10)
    assert task.n == 3 and task.state is State.RUNNING
