"""The ``beanie-tasks`` commands and their error messages, through typer's CliRunner."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from beanie import init_beanie
from typer.testing import CliRunner, Result

from beanie_tasks import State, Task
from beanie_tasks.cli import app, database_in, redact
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.embedded import free_port


class CliEmail(Task):
    to: str

    async def run(self) -> dict[str, str]:
        return {"sent": self.to}


class CliReport(Task):
    class TaskSettings:
        every = 3600

    async def run(self) -> str:
        return "report"


# The CLI imports the task classes above from this very module. They are defined at import
# time on purpose: Beanie's init_beanie marks the shared Task base, and a subclass defined
# after that in the same process would get a bogus default ``id``.
TASKS_MODULE = __name__


@pytest.fixture(scope="module")
def tasks_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """This module, plus a broken and an empty module on sys.path, as the CLI would import them."""
    folder = tmp_path_factory.mktemp("app")
    (folder / "bt_cli_broken.py").write_text("raise RuntimeError('boom at import')\n")
    (folder / "bt_cli_empty.py").write_text("X = 1\n")
    sys.path.insert(0, str(folder))
    try:
        yield sys.modules[__name__]
    finally:
        sys.path.remove(str(folder))


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str, env: dict[str, str] | None = None, **kwargs: Any) -> Result:
    environment = {"MONGODB_URI": "", "MONGODB_DATABASE": "", "BEANIE_TASKS_MODULES": ""} | (env or {})
    return runner.invoke(app, list(args), env=environment, **kwargs)


def one_line_error(result: Result) -> str:
    """The single error line; asserts exit 1 and no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# ------------------------------------------------------ without a server


def test_help_lists_every_command(runner: CliRunner) -> None:
    result = invoke(runner, "--help")
    assert result.exit_code == 0
    for command in ("worker", "status", "inspect", "requeue-failed", "purge", "cancel", "dev-server"):
        assert command in result.stdout


def test_missing_connection_settings(runner: CliRunner, tasks_module: ModuleType) -> None:
    assert "no MongoDB URI" in one_line_error(invoke(runner, "status", "-m", TASKS_MODULE))
    line = one_line_error(invoke(runner, "status", "-m", TASKS_MODULE, "--uri", "mongodb://127.0.0.1:1"))
    assert "no database" in line


def test_bad_uri(runner: CliRunner, tasks_module: ModuleType) -> None:
    line = one_line_error(invoke(runner, "status", "-m", TASKS_MODULE, "--uri", "user:hunter2@localhost", "-d", "x"))
    assert "invalid MongoDB URI" in line and "hunter2" not in line
    line = one_line_error(
        invoke(runner, "status", "-m", TASKS_MODULE, "--uri", "mongodb://bob:hunter2@localhost:notaport/db")
    )
    assert "invalid MongoDB URI" in line and "hunter2" not in line and "bob" not in line


def test_unreachable_server_fails_fast_without_printing_credentials(
    runner: CliRunner, tasks_module: ModuleType
) -> None:
    uri = f"mongodb://alice:s3cr%40t@127.0.0.1:{free_port()}/app"
    started = time.monotonic()
    result = invoke(runner, "status", "-m", TASKS_MODULE, "--timeout", "0.3", env={"MONGODB_URI": uri})
    line = one_line_error(result)
    assert "cannot reach MongoDB" in line and "0.3 s" in line
    assert "s3cr" not in result.output and "alice" not in result.output
    assert time.monotonic() - started < 20


def test_unknown_broken_and_empty_modules(runner: CliRunner, tasks_module: ModuleType) -> None:
    env = {"MONGODB_URI": "mongodb://127.0.0.1:1/db"}
    assert "no module named 'no_such_mod'" in one_line_error(invoke(runner, "status", "-m", "no_such_mod", env=env))
    line = one_line_error(invoke(runner, "status", "-m", "bt_cli_broken", env=env))
    assert "failed to import" in line and "boom at import" in line
    assert "no Task subclasses" in one_line_error(invoke(runner, "status", "-m", "bt_cli_empty", env=env))
    assert "looks like a file path" in one_line_error(invoke(runner, "status", "-m", "app/tasks.py", env=env))
    assert "no task modules" in one_line_error(invoke(runner, "status", env=env))


def test_bad_arguments_are_rejected_before_connecting(runner: CliRunner) -> None:
    env = {"MONGODB_URI": "mongodb://127.0.0.1:1/db"}
    assert "not a task id" in one_line_error(invoke(runner, "inspect", "xyz", "-m", TASKS_MODULE, env=env))
    line = one_line_error(invoke(runner, "purge", "CliEmail", "--state", "CREATED", "-m", TASKS_MODULE, env=env))
    assert "without --force" in line
    line = one_line_error(invoke(runner, "purge", "CliEmail", "--state", "DONE", "-m", TASKS_MODULE, env=env))
    assert "unknown state 'DONE'" in line
    result = invoke(runner, "worker", TASKS_MODULE, "--concurrency", "0", env=env)
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_redaction_and_database_from_uri() -> None:
    assert redact("see mongodb://u:p%40ss@h1,h2/db?authSource=admin") == "see mongodb://***@h1,h2/db?authSource=admin"
    assert redact("mongodb+srv://user@cluster/x") == "mongodb+srv://***@cluster/x"
    assert database_in("mongodb://h:1/app?directConnection=true") == "app"
    assert database_in("mongodb://h:1/?directConnection=true") is None
    assert database_in("mongodb://h:1") is None


# ---------------------------------------------------------- with a server


@pytest.fixture
def cli_env(backend: Any, tasks_module: ModuleType) -> Iterator[dict[str, str]]:
    """Connection settings for a fresh database on the backend, dropped afterwards."""
    assert backend.uri is not None
    name = f"bt_cli_{uuid.uuid4().hex[:10]}"
    yield {"MONGODB_URI": backend.uri, "MONGODB_DATABASE": name, "BEANIE_TASKS_MODULES": TASKS_MODULE}

    async def drop() -> None:
        client = client_for(backend.uri)
        await client.drop_database(name)
        await close_client(client)

    asyncio.run(drop())


def on_database(env: dict[str, str], tasks_module: ModuleType, action: Any) -> Any:
    """Run ``action()`` against the test's database in a loop of its own (the CLI uses others)."""

    async def main() -> Any:
        client = client_for(env["MONGODB_URI"])
        try:
            await init_beanie(
                database=client[env["MONGODB_DATABASE"]],
                document_models=[tasks_module.CliEmail, tasks_module.CliReport],
            )
            return await action()
        finally:
            await close_client(client)

    return asyncio.run(main())


def seed(env: dict[str, str], tasks_module: ModuleType, *recipients: str) -> list[Task]:
    async def push() -> list[Task]:
        return [await tasks_module.CliEmail(to=to).push() for to in recipients]

    return on_database(env, tasks_module, push)  # type: ignore[no-any-return]


@pytest.mark.wire
def test_status_table_and_json(runner: CliRunner, cli_env: dict[str, str], tasks_module: ModuleType) -> None:
    seed(cli_env, tasks_module, "a", "b")
    result = invoke(runner, "status", env=cli_env)
    assert result.exit_code == 0, result.output
    assert "CliEmail" in result.stdout and "CliReport" in result.stdout and "every 3600s" in result.stdout
    rows = {row["class"]: row for row in json.loads(invoke(runner, "status", "--json", env=cli_env).stdout)}
    assert rows["CliEmail"]["CREATED"] == 2 and rows["CliEmail"]["FINISHED"] == 0
    assert rows["CliEmail"]["oldest_ready_seconds"] >= 0
    assert rows["CliReport"]["CREATED"] == 0 and rows["CliReport"]["oldest_ready_seconds"] is None
    assert rows["CliReport"]["schedule"] == "every 3600s"


@pytest.mark.wire
def test_inspect_and_cancel(runner: CliRunner, cli_env: dict[str, str], tasks_module: ModuleType) -> None:
    (task,) = seed(cli_env, tasks_module, "someone@example.com")
    result = invoke(runner, "inspect", str(task.id), env=cli_env)
    assert result.exit_code == 0, result.output
    assert "someone@example.com" in result.stdout and "CREATED" in result.stdout
    document = json.loads(invoke(runner, "inspect", str(task.id), "--json", env=cli_env).stdout)
    assert document["_id"] == str(task.id) and document["to"] == "someone@example.com"

    result = invoke(runner, "cancel", str(task.id), env=cli_env)
    assert result.exit_code == 0 and f"cancelled CliEmail {task.id}" in result.stdout
    assert "already CANCELLED" in one_line_error(invoke(runner, "cancel", str(task.id), env=cli_env))
    missing = "0" * 24
    assert f"no task with id {missing}" in one_line_error(invoke(runner, "inspect", missing, env=cli_env))


@pytest.mark.wire
def test_requeue_failed(runner: CliRunner, cli_env: dict[str, str], tasks_module: ModuleType) -> None:
    seed(cli_env, tasks_module, "a", "b")

    async def fail_one() -> None:
        task = await tasks_module.CliEmail.pop()
        await task.fail("smtp down")

    on_database(cli_env, tasks_module, fail_one)
    result = invoke(runner, "requeue-failed", "CliEmail", env=cli_env)
    assert result.exit_code == 0 and "requeued 1 FAILED CliEmail task(s)" in result.stdout
    counts = on_database(cli_env, tasks_module, tasks_module.CliEmail.counts)
    assert counts[State.CREATED] == 2 and counts[State.FAILED] == 0
    line = one_line_error(invoke(runner, "requeue-failed", "Nope", env=cli_env))
    assert "unknown task class 'Nope'" in line and "CliEmail" in line


@pytest.mark.wire
def test_purge_asks_and_deletes_only_the_given_states(
    runner: CliRunner, cli_env: dict[str, str], tasks_module: ModuleType
) -> None:
    seed(cli_env, tasks_module, "a", "b", "c")

    async def finish_two() -> None:
        for _ in range(2):
            await (await tasks_module.CliEmail.pop()).finish()

    on_database(cli_env, tasks_module, finish_two)
    declined = invoke(runner, "purge", "CliEmail", "--state", "FINISHED", env=cli_env, input="n\n")
    assert declined.exit_code == 1 and "error: purge aborted; nothing was deleted" in declined.stderr
    result = invoke(runner, "purge", "CliEmail", "-s", "finished,failed", env=cli_env, input="y\n")
    assert result.exit_code == 0 and "deleted 2 CliEmail task(s) in FAILED, FINISHED" in result.stdout
    result = invoke(runner, "purge", "CliEmail", "-s", "CREATED", "--force", "--yes", env=cli_env)
    assert result.exit_code == 0 and "deleted 1 CliEmail" in result.stdout
    counts = on_database(cli_env, tasks_module, tasks_module.CliEmail.counts)
    assert sum(counts.values()) == 0
