"""The server stops mid-run and comes back on the same data: nothing pushed is lost.

Workers ride out the outage and reconnect on their own; a push made while the server
is down raises ``PushError`` (within the client's ``serverSelectionTimeoutMS``), and
pushing the same object again afterwards stores it exactly once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from beanie import init_beanie
from fault_tasks import EXECUTIONS, Job
from faultkit import Consumers, wait_until
from pymongo.errors import ConnectionFailure

from beanie_tasks import PushError, State
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.embedded import EmbeddedServer

pytestmark = pytest.mark.wire
DATABASE = "bt_restart"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(storage_path=str(tmp_path / "data"), log_path=str(tmp_path / "server.log")) as running:
        yield running


@pytest.fixture
async def database(server: EmbeddedServer) -> AsyncIterator[Any]:
    client = client_for(server.uri, serverSelectionTimeoutMS=1500)
    await init_beanie(database=client[DATABASE], document_models=[Job])
    yield client[DATABASE]
    await close_client(client)


async def test_workers_and_producers_survive_a_server_restart(
    server: EmbeddedServer, database: Any, consumers: Consumers
) -> None:
    first = [await Job(n=i, work=0.05).push() for i in range(20)]
    for name in ("w1", "w2"):
        consumers.start(server.uri, DATABASE, "Job", concurrency=4, name=name)

    async def some_finished() -> bool:
        return await Job.find(Job.state == State.FINISHED).count() >= 4

    await wait_until(some_finished, timeout=60, what="the workers to get going")
    port = server.port
    server.stop()  # mid-run: tasks are running and queued

    pending = Job(n=100)
    started = time.monotonic()
    with pytest.raises(PushError, match="may or may not be stored") as raised:
        await pending.push()
    assert isinstance(raised.value.__cause__, ConnectionFailure)
    assert time.monotonic() - started < 30  # bounded by serverSelectionTimeoutMS
    assert pending.id is None

    server.start()  # same port, same data
    assert server.port == port
    await pending.push()  # the same object: safe to push again
    later = [await Job(n=200 + i).push() for i in range(10)]
    pushed = [*first, pending, *later]

    async def all_finished() -> bool:
        return await Job.find(Job.state == State.FINISHED).count() == len(pushed)

    await wait_until(all_finished, timeout=120, what="every pushed task to finish after the restart")
    consumers.stop_all()

    assert await Job.find_all().count() == len(pushed)  # nothing lost, nothing doubled
    counts = await Job.counts()
    assert counts[State.FINISHED] == len(pushed) and counts[State.RUNNING] == 0 and counts[State.CREATED] == 0
    run_tokens = {(e["task"], e["token"]) async for e in database[EXECUTIONS].find({"event": "start"})}
    for task in pushed:
        stored = await Job.get(task.id)
        # Finished by a run that really happened, which wrote its own lease token.
        assert stored is not None and stored.result == {"n": stored.n, "token": stored.lease_token}
        assert (task.id, stored.lease_token) in run_tokens
