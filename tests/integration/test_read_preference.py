"""The queue's reads go to the primary, whatever read preference the application's client has.

An application may open its client with ``readPreference=secondaryPreferred`` for its own
queries; the queue's reads (dependency states at push, ``wait()``, ``counts()``...) decide
transitions and must not see a lagging secondary.

What PyMongo sends, found against the SecantusDB test server: through the suite's usual URI
(``directConnection=true``, topology Single) every read carries ``$readPreference:
{mode: primaryPreferred}`` whatever the client's setting, as the driver spec requires for a
direct connection, so nothing can be told apart there. Connected as a replica set
(``replicaSet=<setName>`` from ``hello``, no direct connection; topology
ReplicaSetWithPrimary) a read under ``secondaryPreferred`` carries
``$readPreference: {mode: secondaryPreferred}`` and a primary read carries none. The test
connects that way, so the read preference the library chose is visible on the wire.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from beanie import Link, init_beanie
from pymongo import monitoring

from beanie_tasks import DependencyType, State, Task, depends_on
from beanie_tasks.driver import close_client
from beanie_tasks.testing import CommandCounter
from tests.conftest import Backend

READ_COMMANDS = frozenset({"find", "aggregate", "count", "distinct"})


class ReadParent(Task):
    n: int = 0


class ReadChild(Task):
    n: int = 0
    parent: Link[ReadParent] = depends_on(DependencyType.DIRECT)


class ReadRecorder(CommandCounter):
    """A CommandCounter that also keeps every read command it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[Mapping[str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        super().started(event)
        if event.command_name in READ_COMMANDS:
            self.reads.append(event.command)

    def reset(self) -> None:
        super().reset()
        self.reads.clear()


@pytest.fixture
async def secondary_preferred(backend: Backend, db: Any) -> AsyncIterator[ReadRecorder]:
    """Beanie initialised on a replica-set client with readPreference=secondaryPreferred, watched by a recorder."""
    hello = await db.client.admin.command("hello")
    set_name = hello.get("setName")
    if not set_name:
        pytest.skip("the server is not a replica set member: the driver sends no $readPreference to a standalone")
    recorder = ReadRecorder()
    client = backend.client(
        event_listeners=[recorder],
        replicaSet=set_name,
        directConnection=False,
        readPreference="secondaryPreferred",
    )
    try:
        await init_beanie(database=client[db.name], document_models=[ReadParent, ReadChild])
        probe = await client[db.name]["bt_probe"].find_one({})
        assert probe is None
        sent = recorder.last["find"].get("$readPreference")
        assert sent == {"mode": "secondaryPreferred"}, f"the client's own reads do not show its preference: {sent}"
        recorder.reset()
        yield recorder
    finally:
        await close_client(client)


def mode_of(command: Mapping[str, Any]) -> str:
    preference = command.get("$readPreference") or {"mode": "primary"}
    return str(preference.get("mode"))


@pytest.mark.wire
async def test_queue_reads_go_to_the_primary(secondary_preferred: ReadRecorder) -> None:
    """push, push of a linked dependent, pop, finish, wait() and counts() send no read with a non-primary preference."""
    recorder = secondary_preferred
    parent = await ReadParent(n=1).push()
    child = await ReadChild(n=2, parent=parent).push()
    claimed = await ReadParent.pop()
    assert claimed is not None and claimed.id == parent.id
    await claimed.finish("parent done")
    done = await parent.wait(timeout=10)
    assert done.state is State.FINISHED
    claimed_child = await ReadChild.pop()
    assert claimed_child is not None and claimed_child.id == child.id
    await claimed_child.finish("child done")
    assert (await child.wait(timeout=10)).result == "child done"
    assert (await ReadParent.counts())[State.FINISHED] == 1
    assert (await ReadChild.counts())[State.FINISHED] == 1

    assert recorder.reads, "expected the library to read (dependency states, wait, counts)"
    off_primary = [
        (name, command[name], mode_of(command))
        for command in recorder.reads
        for name in [next(iter(command))]
        if mode_of(command) != "primary"
    ]
    assert not off_primary, (
        f"{len(off_primary)} of {len(recorder.reads)} reads were not sent to the primary: {off_primary}"
    )
