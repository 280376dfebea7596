"""Batched claims from several processes at once: every task is claimed exactly once."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from beanie_tasks import State, Task

ROOT = Path(__file__).resolve().parents[2]

CLAIMER = """
import asyncio, json, sys
from beanie import init_beanie
from beanie_tasks import Task, claim_batch, finish_batch
from beanie_tasks.driver import client_for, close_client

class Chunk(Task):
    n: int

async def main() -> None:
    client = client_for(sys.argv[1])
    await init_beanie(database=client[sys.argv[2]], document_models=[Chunk])
    k = int(sys.argv[3])
    print("ready", flush=True)
    sys.stdin.readline()  # every claimer starts at once, so their batches race
    claimed = []
    while batch := await claim_batch(Chunk, k, consumer_id=f"proc-{k}"):
        priorities = [t.priority for t in batch]
        assert priorities == sorted(priorities, reverse=True), priorities
        claimed.extend(str(t.id) for t in batch)
        ack = await finish_batch(batch)
        assert not ack.lost, ack.lost
    print(json.dumps(claimed), flush=True)
    await close_client(client)

asyncio.run(main())
"""


class Chunk(Task):
    n: int


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Chunk)


@pytest.mark.wire
async def test_batch_claimers_in_separate_processes_share_nothing(backend: Any, db: Any) -> None:
    ids = {str((await Chunk(n=n, priority=n % 3).push()).id) for n in range(60)}
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLAIMER,
            backend.uri,
            db.name,
            str(k),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for k in (3, 5, 8)
    ]
    for process in processes:
        assert process.stdout is not None
        assert (await asyncio.wait_for(process.stdout.readline(), 120)).strip() == b"ready"
    claimed: list[str] = []
    outcomes = await asyncio.gather(*(asyncio.wait_for(p.communicate(b"go\n"), 120) for p in processes))
    for process, (out, err) in zip(processes, outcomes, strict=True):
        assert process.returncode == 0, err.decode()[-2000:]
        claimed.extend(json.loads(out.decode().strip().splitlines()[-1]))
    assert len(claimed) == len(set(claimed)) == 60
    assert set(claimed) == ids
    counts = await Chunk.counts()
    assert counts[State.FINISHED] == 60 and counts[State.RUNNING] == 0
