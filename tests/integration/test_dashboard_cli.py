"""``beanie-tasks dashboard``: serves the pages over HTTP in its own process, as an operator starts it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from beanie_tasks import Task
from tests.conftest import stop_subprocess

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


class DashPing(Task):
    note: str = ""


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(DashPing)


def environment() -> dict[str, str]:
    paths = [str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]
    return os.environ | {"PYTHONPATH": os.pathsep.join(p for p in paths if p), "MONGODB_URI": ""}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.wire
async def test_dashboard_command_serves_the_queue(backend: Any, db: Any) -> None:
    task = await DashPing(note="from the CLI test").push()
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "beanie_tasks.cli", "dashboard", __name__, "--port", str(port),
        "--uri", backend.uri, "--database", db.name, "--read-only",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment(),
    )  # fmt: skip
    assert process.stderr is not None
    try:
        line = (await asyncio.wait_for(process.stderr.readline(), timeout=60)).decode()
        assert re.search(rf"http://127\.0\.0\.1:{port}/", line), line
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for _ in range(100):
                try:
                    page = await http.get("/")
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.1)
            assert page.status_code == 200 and 'data-class="DashPing"' in page.text
            detail = await http.get(f"/tasks/DashPing/{task.id}")
            assert "from the CLI test" in detail.text and "read-only" in detail.text
            async with http.stream("GET", "/events") as events:
                lines = events.aiter_lines()
                assert await asyncio.wait_for(anext(lines), 30) == "event: hello"
                mode = await asyncio.wait_for(anext(lines), 30)
                assert mode in ("data: stream", "data: poll")
                await DashPing(note="a change the page should hear of").push()

                async def refreshed() -> None:
                    async for line in lines:
                        if line == "event: refresh":
                            return

                await asyncio.wait_for(refreshed(), 10)  # well before the quiet-time refresh (30 s)
    finally:
        await stop_subprocess(process)
    assert process.returncode in (0, -signal.SIGTERM)


def test_dashboard_command_errors_are_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run(
            [sys.executable, "-m", "beanie_tasks.cli", "dashboard", __name__, "--port", str(port),
             "--uri", "mongodb://127.0.0.1:1/x"],
            capture_output=True, text=True, env=environment(), timeout=60,
        )  # fmt: skip
    assert busy.returncode == 1
    lines = [line for line in busy.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot listen on"), busy.stderr
    unknown = subprocess.run(
        [sys.executable, "-m", "beanie_tasks.cli", "dashboard", "no_such_module_xyz", "--port", str(free_port()),
         "--uri", "mongodb://127.0.0.1:1/x", "--timeout", "0.5"],
        capture_output=True, text=True, env=environment(), timeout=60,
    )  # fmt: skip
    assert unknown.returncode == 1 and unknown.stderr.strip().count("\n") == 0, unknown.stderr
    assert "no_such_module_xyz" in unknown.stderr
