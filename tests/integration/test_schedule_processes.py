"""Two scheduler processes on one database: every slot still produces exactly one task."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from beanie_tasks.schedule import CURSOR_COLLECTION

SCHEDULER = textwrap.dedent(
    """
    import asyncio, sys
    from beanie import init_beanie
    from beanie_tasks import Task
    from beanie_tasks.driver import client_for
    from beanie_tasks.schedule import run_schedules

    class Beat(Task):
        class TaskSettings:
            every = 1

    async def main(uri: str, database: str, seconds: float) -> None:
        client = client_for(uri, serverSelectionTimeoutMS=10_000)
        await init_beanie(database=client[database], document_models=[Beat])
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # start together with the other scheduler
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        await run_schedules([Beat], stop)

    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
    """
)


@pytest.mark.wire
async def test_two_scheduler_processes_produce_one_task_per_slot(backend: Any, db: Any, tmp_path: Path) -> None:
    script = tmp_path / "scheduler.py"
    script.write_text(SCHEDULER)
    assert backend.uri is not None
    command = [sys.executable, str(script), backend.uri, db.name, "4.5"]
    pipe = asyncio.subprocess.PIPE
    processes = [await asyncio.create_subprocess_exec(*command, stdin=pipe, stdout=pipe, stderr=pipe) for _ in range(2)]
    try:
        for process in processes:
            assert process.stdout is not None
            assert await asyncio.wait_for(process.stdout.readline(), timeout=60) == b"ready\n"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(b"go\n")
            await process.stdin.drain()
        for process in processes:
            _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
            assert process.returncode == 0, stderr.decode()[-2000:]
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()

    tasks = [row async for row in db["Beat"].find({}, {"run_at": 1})]
    per_slot = Counter(row["run_at"] for row in tasks)
    assert len(per_slot) >= 2, f"expected several slots in 4.5 s, got {sorted(per_slot)}"
    assert set(per_slot.values()) == {1}, f"a slot produced more than one task: {per_slot}"
    cursor = await db[CURSOR_COLLECTION].find_one({})
    assert cursor is not None and cursor["last_slot"] == max(per_slot)
