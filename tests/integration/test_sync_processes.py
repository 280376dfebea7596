"""A plain script pushes with push_sync from several threads; `beanie-tasks worker` in another process runs them.

Neither process shares anything with the test: the script sets Beanie up through
``beanie_tasks.sync.init`` alone, as a Django command or a cron job would.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Backend, stop_subprocess

ROOT = Path(__file__).resolve().parents[2]

TASKS = """
from beanie_tasks import Task


class Greet(Task):
    name: str

    def run(self) -> str:
        return f"hello {self.name}"
"""

PRODUCER = """
import json, os, sys, threading

import beanie_tasks.sync
from greet_tasks import Greet

beanie_tasks.sync.init(os.environ["MONGODB_URI"], document_models=[Greet], database=os.environ["MONGODB_DATABASE"])
pushed = []
lock = threading.Lock()


def push(start):
    for n in range(start, start + 3):
        task = Greet(name=f"user{n}").push_sync()
        with lock:
            pushed.append(task)


threads = [threading.Thread(target=push, args=(i * 10,)) for i in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(sorted(task.wait_sync(timeout=120).result for task in pushed)))
beanie_tasks.sync.close()
"""


@pytest.mark.wire
async def test_a_sync_script_pushes_and_a_worker_process_runs(backend: Backend, db: Any, tmp_path: Path) -> None:
    assert backend.uri is not None
    (tmp_path / "greet_tasks.py").write_text(textwrap.dedent(TASKS))
    (tmp_path / "producer.py").write_text(textwrap.dedent(PRODUCER))
    path = os.pathsep.join(filter(None, [str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"PYTHONPATH": path, "MONGODB_URI": backend.uri, "MONGODB_DATABASE": db.name}
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "beanie_tasks.cli", "worker", "greet_tasks",
        cwd=tmp_path, env=env, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        producer = await asyncio.create_subprocess_exec(
            sys.executable, "producer.py", cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(producer.communicate(), timeout=180)
        assert producer.returncode == 0, stderr.decode()[-3000:]
        assert json.loads(stdout) == sorted(f"hello user{i * 10 + n}" for i in range(4) for n in range(3))
    finally:
        await stop_subprocess(worker)
