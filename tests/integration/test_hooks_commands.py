"""Hooks, metrics and tracing cost no command: the same workload sends the same commands with them off and on.

Claims that found nothing depend on timing (an idle worker polls), so they are left out;
every other command, the claims that took a task included, is compared one for one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import pytest
from beanie import init_beanie
from pymongo import monitoring

from beanie_tasks import Task, Worker, hooks
from beanie_tasks.driver import close_client
from beanie_tasks.metrics import Metrics
from beanie_tasks.testing import BACKGROUND_COMMANDS, eventually, running
from beanie_tasks.tracing import Tracing

TASKS = 5


class CountedWork(Task):
    n: int

    class TaskSettings:
        recovery_interval = 3600.0  # one maintenance round per run: the same in both
        poll_interval = 0.05

    async def run(self) -> int:
        return self.n


class Commands(monitoring.CommandListener):
    """Each command by name; a claim (findAndModify that takes an attempt) by whether it found a task."""

    def __init__(self) -> None:
        self.sent: dict[int, str] = {}
        self.names: Counter[str] = Counter()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in BACKGROUND_COMMANDS:
            return
        update = event.command.get("update") if event.command_name == "findAndModify" else None
        claim = isinstance(update, dict) and update.get("$inc") == {"attempts": 1}
        self.sent[event.request_id] = "claim" if claim else event.command_name

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        name = self.sent.pop(event.request_id, None)
        if name == "claim":
            name = "claim (took a task)" if event.reply.get("value") else None
        if name is not None:
            self.names[name] += 1

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.names[f"failed {self.sent.pop(event.request_id, '?')}"] += 1


class Everything(hooks.Middleware):
    async def before_run(self, task: Task) -> None:
        pass

    async def after_run(self, task: Task, outcome: hooks.Outcome) -> None:
        pass


async def workload(backend: Any, attach: Any = None, **worker_options: Any) -> Counter[str]:
    """Push TASKS tasks and run them with a fresh worker; the commands it took, by name."""
    listener = Commands()
    client = backend.client(event_listeners=[listener])
    name = f"bt_{uuid.uuid4().hex[:12]}"
    try:
        await init_beanie(database=client[name], document_models=[CountedWork])
        listener.names.clear()
        for i in range(TASKS):
            await CountedWork(n=i).push()
        worker = Worker([CountedWork], concurrency=1, use_change_stream=False, schedules=False, **worker_options)
        if attach is not None:
            attach(worker)
        async with running(worker):
            # Waiting on the worker's own count: polling the database would add commands.
            await eventually(lambda: asyncio.sleep(0, result=worker.stats["finished"] == TASKS), timeout=60)
            return listener.names.copy()
    finally:
        await client.drop_database(name)
        await close_client(client)


@pytest.mark.wire
async def test_hooks_metrics_and_tracing_send_no_extra_command(backend: Any) -> None:
    plain = await workload(backend)

    metrics, tracing = Metrics(), Tracing()
    tracing.install()
    try:
        instrumented = await workload(
            backend,
            middleware=[Everything(), tracing],
            on_startup=[lambda worker: None],
            on_shutdown=[lambda worker: None],
            attach=lambda worker: metrics.attach(worker, queue_stats_every=None),
        )
    finally:
        tracing.uninstall()
        metrics.detach()

    assert plain["claim (took a task)"] == TASKS and plain["insert"] == TASKS
    assert instrumented == plain
