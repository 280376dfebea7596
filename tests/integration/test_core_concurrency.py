"""Four OS processes, each with several coroutines, drain a few hundred tasks exactly once."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from beanie import init_beanie

from beanie_tasks import State, Task
from tests.conftest import Backend

TASKS = 80
PROCESSES = 4
COROUTINES = 3

# A consumer process: claims with pop() until the queue is empty, records every claim in a
# collection keyed by task id (a second claim of the same task is a duplicate-key error),
# then finishes the task.
CONSUMER = textwrap.dedent(
    """
    import asyncio, os, sys
    from beanie import init_beanie
    from pymongo.errors import DuplicateKeyError
    from beanie_tasks import Task
    from beanie_tasks.driver import client_for, close_client


    class Unit(Task):
        n: int

        class Settings:
            name = "units"


    async def consume(db, worker):
        processed = 0
        while (task := await Unit.pop(consumer_id=worker)) is not None:
            try:
                await db.claims.insert_one({"_id": task.id, "by": worker, "n": task.n})
            except DuplicateKeyError:
                print(f"task {task.n} claimed twice", file=sys.stderr)
                raise SystemExit(3)
            await task.finish(result=worker)
            processed += 1
        return processed


    async def main(uri, name, coroutines):
        client = client_for(uri)
        db = client[name]
        await init_beanie(database=db, document_models=[Unit])
        pid = os.getpid()
        done = await asyncio.gather(*(consume(db, f"{pid}:{i}") for i in range(coroutines)))
        print(sum(done))
        await close_client(client)


    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


class Unit(Task):
    n: int

    class Settings:
        name = "units"


@pytest.mark.slow
@pytest.mark.wire
async def test_many_processes_process_every_task_exactly_once(backend: Backend, db: Any, tmp_path: Path) -> None:
    await init_beanie(database=db, document_models=[Unit])
    for n in range(TASKS):
        await Unit(n=n).push()
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    assert backend.uri is not None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            backend.uri,
            db.name,
            str(COROUTINES),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        for _ in range(PROCESSES)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in processes)), timeout=240)
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err.decode()[-2000:]
    per_process = [int(out.decode().split()[-1]) for out, _ in outputs]
    assert sum(per_process) == TASKS
    assert await db.claims.count_documents({}) == TASKS
    claimed = {row["n"] async for row in db.claims.find({}, {"n": 1})}
    assert claimed == set(range(TASKS))
    counts = await Unit.counts()
    assert counts[State.FINISHED] == TASKS and sum(counts.values()) == TASKS
    workers = {row["by"].split(":")[0] async for row in db.claims.find({}, {"by": 1})}
    assert len(workers) > 1, "the work was shared between processes"
