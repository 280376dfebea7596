"""Test helpers for the fault suite: consumer subprocesses, bounded waits, failpoints."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HELPERS = Path(__file__).resolve().parent


class Consumers:
    """Starts ``helpers/consumer.py`` processes and makes sure none outlives the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        uri: str,
        database: str,
        task_class: str,
        *,
        concurrency: int = 4,
        name: str = "c",
        worker: bool = True,
        max_seconds: float | None = None,
    ) -> Any:
        """Start a consumer: the real ``Worker`` by default, else coroutines on ``Task.queue()``.

        It stops by itself after ``max_seconds`` (the consumer's own default when None).
        """
        log = open(self.tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - handed to the child
        command = [sys.executable, str(HELPERS / "consumer.py"), uri, database, task_class]
        command += ["--concurrency", str(concurrency), "--consumer-id", name] + (["--worker"] if worker else [])
        if max_seconds is not None:
            command += ["--max-seconds", str(max_seconds)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        log.close()
        self.processes.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()  # bounded: the child prints "ready" or exits
        assert line.strip() == b"ready", f"consumer {name} did not start: {self.log(name)}"
        return process

    def log(self, name: str) -> str:
        path = self.tmp_path / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self, timeout: float = 20.0) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()


async def wait_until(probe: Callable[[], Awaitable[Any]], *, timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll ``probe`` until it returns ``True`` or another truthy value that is not a string.

    A string is a progress report, shown if the wait times out after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value and not isinstance(value, str):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {value!r})")
        await asyncio.sleep(every)


class FailPoints:
    """Arms ``failCommand`` for one application name only, and always disarms it."""

    APP_NAME = "bt-faults"

    def __init__(self, admin_client: Any) -> None:
        self.admin = admin_client.admin

    async def arm(self, commands: list[str], *, times: int = 1, **data: Any) -> None:
        body = {"failCommands": commands, "appName": self.APP_NAME} | data
        await self.admin.command({"configureFailPoint": "failCommand", "mode": {"times": times}, "data": body})

    async def disarm(self) -> None:
        await self.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
