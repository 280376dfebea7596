"""``beanie-tasks worker`` as an operator runs it: JSON logs on stderr, /metrics and /healthz over HTTP, --setup."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from beanie_tasks import State, Task
from beanie_tasks.testing import eventually

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from obs_app import ObsDoomed, ObsFlaky, ObsSignup, ObsWelcome  # noqa: E402


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


async def ended(task_class: type[Task], task_id: Any) -> Task | None:
    stored = await task_class.get(task_id)
    return stored if stored is not None and stored.state.is_terminal else None


@pytest.mark.wire
async def test_worker_logs_json_serves_metrics_and_health_runs_setup(backend: Any, db: Any, init_tasks: Any) -> None:
    await init_tasks(ObsWelcome, ObsFlaky, ObsDoomed, ObsSignup)
    welcome = await ObsWelcome(email="ada@example.com").push()
    flaky = await ObsFlaky().push()
    doomed = await ObsDoomed().push()

    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"MONGODB_URI": backend.uri, "MONGODB_DATABASE": db.name, "PYTHONPATH": path}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "beanie_tasks.cli", "worker", "obs_app",
        "--log-format", "json", "--log-level", "DEBUG", "--setup", "obs_app:setup",
        "--metrics-port", "0", "--metrics-host", "127.0.0.1",
        cwd=HERE, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    lines: list[str] = []

    async def read_stderr() -> None:
        assert process.stderr is not None
        async for line in process.stderr:
            lines.append(line.decode())

    reader = asyncio.create_task(read_stderr())
    try:

        async def metrics_url() -> str | None:
            found = re.search(r"metrics on (http://127\.0\.0\.1:\d+)/metrics", "".join(lines))
            return found[1] if found else None

        base = await eventually(metrics_url, timeout=60)
        for task_class, task in ((ObsWelcome, welcome), (ObsFlaky, flaky), (ObsDoomed, doomed)):
            await eventually(lambda c=task_class, t=task: ended(c, t.id), timeout=60)  # type: ignore[misc]

        async def scraped() -> str | None:
            status, body = await asyncio.to_thread(get, f"{base}/metrics")
            return body if status == 200 and 'beanie_tasks_failed_total{task_class="ObsDoomed"} 1.0' in body else None

        body = await eventually(scraped, timeout=30)
        health = await asyncio.to_thread(get, f"{base}/healthz")
        ready = await asyncio.to_thread(get, f"{base}/readyz")
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), timeout=60)
        await asyncio.wait_for(reader, timeout=10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        reader.cancel()

    log = "".join(lines)
    assert process.returncode == 0, log[-3000:]
    assert 'beanie_tasks_finished_total{task_class="ObsWelcome"} 1.0' in body
    assert 'beanie_tasks_retried_total{task_class="ObsFlaky"} 1.0' in body
    assert 'beanie_tasks_finished_total{task_class="ObsFlaky"} 1.0' in body
    assert 'beanie_tasks_run_duration_seconds_count{task_class="ObsWelcome"} 1.0' in body
    assert "process_cpu_seconds_total" in body  # the default registry, with the process metrics
    assert health[0] == 200 and json.loads(health[1])["alive"] is True
    assert ready[0] == 200 and json.loads(ready[1])["ready"] is True

    # The app model in the module was registered: the task that writes it finished.
    assert (await ObsWelcome.get(welcome.id)).state is State.FINISHED  # type: ignore[union-attr]
    assert await ObsSignup.find_one({"email": "ada@example.com"}) is not None

    records = [json.loads(line) for line in lines if line.strip()]  # every line is JSON, the CLI's own too
    assert not [r for r in records if not r["logger"].startswith("beanie_tasks")], "only our loggers, at DEBUG"
    about = {str(t.id): [r for r in records if r.get("task_id") == str(t.id)] for t in (welcome, flaky, doomed)}
    [finished] = about[str(welcome.id)]
    assert finished["level"] == "INFO" and finished["task_class"] == "ObsWelcome" and finished["attempt"] == 1
    assert isinstance(finished["duration"], float) and "finished" in finished["message"]
    retry, second = about[str(flaky.id)]
    assert retry["level"] == "WARNING" and "TimeoutError: smtp did not answer" in retry["message"]
    assert second["level"] == "INFO" and second["attempt"] == 2
    [final] = about[str(doomed.id)]
    assert final["level"] == "ERROR" and "LookupError: no such template" in final["message"]
    assert "Traceback (most recent call last)" in final["traceback"]
    messages = [r["message"] for r in records]
    assert "setup hook ran for 3 classes" in messages and "setup hook closed" in messages
    failed = await ObsDoomed.get(doomed.id)
    assert failed is not None and failed.traceback is not None and "welcome.html" in failed.traceback


def worker_error(*args: str, uri: str = "mongodb://127.0.0.1:1/db") -> list[str]:
    """Run ``beanie-tasks worker obs_app ARGS`` in-process: exit 1, no traceback; its stderr lines."""
    from typer.testing import CliRunner

    from beanie_tasks.cli import app

    env = {"MONGODB_URI": uri, "MONGODB_DATABASE": "", "BEANIE_TASKS_MODULES": ""}
    result = CliRunner().invoke(app, ["worker", "obs_app", "--timeout", "5", *args], env=env)
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    return [line for line in result.stderr.splitlines() if line.strip()]


def one_line_error(*args: str) -> str:
    lines = worker_error(*args)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--log-level", "LOUD"], "error: unknown log level 'LOUD'; use DEBUG, INFO, WARNING, ERROR"),
        (["--driver-log-level", "chatty"], "error: unknown log level 'chatty'"),
        (["--log-format", "xml"], "error: unknown log format 'xml'; use text or json"),
        (["--setup", "obs_app"], "error: 'obs_app' is not module:function (for example myapp.worker:setup)"),
        (["--setup", "obs_app:nope"], "error: module 'obs_app' has no 'nope' (from 'obs_app:nope')"),
        (["--setup", "obs_app:NOT_CALLABLE"], "error: 'obs_app:NOT_CALLABLE' is a int, not a function"),
        (["--setup", "no_such_module:setup"], "error: no module named 'no_such_module'"),
    ],
)
def test_bad_options_are_one_clear_line(args: list[str], message: str) -> None:
    assert one_line_error(*args).startswith(message)


@pytest.mark.wire
async def test_a_failing_setup_hook_is_one_line_without_credentials(backend: Any, db: Any, init_tasks: Any) -> None:
    await init_tasks(ObsWelcome, ObsFlaky, ObsDoomed, ObsSignup)
    uri = backend.uri.replace("/?", f"/{db.name}?", 1) if "/?" in backend.uri else backend.uri
    *_, line = await asyncio.to_thread(worker_error, "--setup", "obs_app:broken_setup", uri=uri)
    assert line.startswith("error: startup hook broken_setup failed: RuntimeError: cannot open mongodb://***@")
    assert "s3cret" not in line and "reporting" not in line
