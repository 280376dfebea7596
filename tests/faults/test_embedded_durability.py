"""An embedded server on disk keeps every acknowledged push, even when it is killed with SIGKILL.

Without ``--sync-on-commit`` SecantusDB acknowledges a write before its log reaches the
disk, and a SIGKILL right after a burst of pushes loses a few of them (2 to 13 of 200 in
every try here). On disk, ``EmbeddedServer`` now starts it durable by default.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from beanie import init_beanie
from fault_tasks import Job

from beanie_tasks.driver import client_for, close_client
from beanie_tasks.embedded import EmbeddedServer

pytestmark = pytest.mark.wire
DATABASE = "bt_durability"
PUSHES = 200


async def test_acknowledged_pushes_survive_a_sigkill(tmp_path: Path) -> None:
    server = EmbeddedServer(storage_path=str(tmp_path / "data"), log_path=str(tmp_path / "server.log"))
    try:
        server.start()
        client = client_for(server.uri, serverSelectionTimeoutMS=10_000)
        try:
            await init_beanie(database=client[DATABASE], document_models=[Job])
            pushed = {(await Job(n=i).push()).id for i in range(PUSHES)}  # each one acknowledged
            server.stop(kill=True)  # SIGKILL, right after the last acknowledgement
        finally:
            await close_client(client)
        assert len(pushed) == PUSHES

        server.start()  # same path, same port
        client = client_for(server.uri, serverSelectionTimeoutMS=10_000)
        try:
            stored = {doc["_id"] async for doc in client[DATABASE][Job.Settings.name].find({}, {"_id": 1})}
        finally:
            await close_client(client)
        assert len(pushed - stored) == 0, f"{len(pushed - stored)} of {PUSHES} acknowledged pushes were lost"
        assert stored == pushed
        assert "--sync-on-commit" in server.command
    finally:
        server.close()


@pytest.mark.parametrize(
    ("storage_path", "durable", "syncs"),
    [
        (None, None, False),
        (":memory:", None, False),
        ("/some/dir", None, True),
        ("/some/dir", False, False),
        (None, True, True),
    ],
)
def test_durable_by_default_exactly_on_disk(storage_path: str | None, durable: bool | None, syncs: bool) -> None:
    assert EmbeddedServer(port=1, storage_path=storage_path, durable=durable).syncs_on_commit is syncs
