"""The pytest plugin as a user meets it: a project of their own, no conftest import, both loop scopes.

Each case runs pytest in a subprocess (pytester) on a small project whose tests use
``task_database`` and ``run_now`` without importing them.
"""

from __future__ import annotations

import os
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from beanie_tasks.embedded import EmbeddedServer

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]

TASKS = """
import asyncio

from beanie_tasks import Backoff, Task


class Report(Task):
    pages: int

    async def run(self) -> dict[str, int]:
        for page in range(self.pages):
            await self.set_progress((page + 1) / self.pages, f"page {page + 1}")
            await asyncio.sleep(0)
        return {"pages": self.pages}


class Slow(Task):
    class TaskSettings:
        visibility_timeout = 0.6  # heartbeats every 0.2 s

    async def run(self) -> str:
        await asyncio.sleep(1.0)  # spans several heartbeats, which must not disturb the run
        return "done"


class Flaky(Task):
    class TaskSettings:
        max_attempts = 2
        backoff = Backoff(base=0, jitter=0)

    async def run(self) -> None:
        raise RuntimeError("the printer is on fire")


class Stamp(Task):
    def run(self) -> str:  # a sync handler runs in a thread, as under the worker
        return f"stamped {self.id}"
"""

TESTS = """
import pytest

from beanie_tasks import State, TransitionError
from beanie_tasks.testing import run_now
from myapp.tasks import Flaky, Report, Slow, Stamp

pytestmark = pytest.mark.asyncio(loop_scope="{loop_scope}")


async def test_a_report_runs_with_progress(task_database):
    report = await Report(pages=3).push()
    done = await run_now(report)
    assert done.state is State.FINISHED
    assert done.result == {{"pages": 3}}
    assert done.progress == 1.0 and done.progress_message == "page 3"
    stored = await Report.get(report.id)
    assert stored.state is State.FINISHED and stored.attempts == 1


async def test_a_run_that_spans_heartbeats(task_database):
    done = await run_now(await Slow().push())
    assert done.state is State.FINISHED and done.result == "done"


async def test_a_failure_is_retried_then_dead_lettered(task_database):
    task = await Flaky().push()
    first = await run_now(task)
    assert first.state is State.CREATED and "on fire" in (first.last_error or "") and first.attempts == 1
    second = await run_now(task)
    assert second.state is State.FAILED and second.attempts == 2


async def test_a_sync_handler(task_database):
    task = await Stamp().push()
    assert (await run_now(task)).result == f"stamped {{task.id}}"


async def test_a_task_that_cannot_run_says_why(task_database):
    report = await Report(pages=1).push()
    await run_now(report)
    with pytest.raises(TransitionError, match="it is FINISHED, not CREATED"):
        await run_now(report)
    later = await Report(pages=1).push(delay=3600)
    with pytest.raises(TransitionError, match="scheduled for"):
        await run_now(later)


async def test_each_test_gets_its_own_database(task_database):
    assert await Report.count() == 0
    await Report(pages=1).push()
"""

CONFIG = """
[pytest]
asyncio_mode = {mode}
asyncio_default_fixture_loop_scope = function
beanie_tasks_models = myapp.tasks
"""

TOML_CONFIG = """
[tool.pytest.ini_options]
asyncio_mode = "{mode}"
asyncio_default_fixture_loop_scope = "function"
beanie_tasks_models = ["myapp.tasks"]
"""


def plugin_installed() -> bool:
    return any(ep.name == "beanie_tasks" for ep in entry_points(group="pytest11"))


def test_the_entry_point_is_declared() -> None:
    declared = '[project.entry-points.pytest11]\nbeanie_tasks = "beanie_tasks.pytest_plugin"\n'
    assert declared in (ROOT / "pyproject.toml").read_text()


@pytest.fixture
def server_uri(request: pytest.FixtureRequest) -> str:
    configured = os.environ.get("MONGODB_URI")
    if configured:
        return configured
    server: EmbeddedServer = request.getfixturevalue("secantus")
    return server.uri


def declare_entry_point(directory: Path) -> None:
    """Make ``directory`` hold what installing the package adds for the plugin: its pytest11 entry point."""
    info = directory / "beanie_tasks_entry_point-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: beanie-tasks-entry-point\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[pytest11]\nbeanie_tasks = beanie_tasks.pytest_plugin\n")


@pytest.mark.parametrize(
    ("loop_scope", "mode", "config", "load"),
    [
        ("function", "strict", "ini", "entry point"),
        ("session", "strict", "ini", "entry point"),
        ("session", "auto", "toml", "-p"),
    ],
)
def test_a_users_project(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
    server_uri: str,
    loop_scope: str,
    mode: str,
    config: str,
    load: str,
) -> None:
    if config == "ini":
        pytester.makeini(CONFIG.format(mode=mode))
    else:
        pytester.makepyprojecttoml(TOML_CONFIG.format(mode=mode))
    pytester.mkpydir("myapp")
    pytester.path.joinpath("myapp", "tasks.py").write_text(textwrap.dedent(TASKS))
    pytester.makepyfile(test_reports=TESTS.format(loop_scope=loop_scope))
    assert not list(pytester.path.glob("conftest.py")), "a user's project needs no conftest"
    paths = [str(pytester.path), str(ROOT), os.environ.get("PYTHONPATH", "")]
    plugin: list[str] = []
    if not plugin_installed():
        if load == "entry point":
            site = tmp_path_factory.mktemp("site")
            declare_entry_point(site)
            paths.insert(0, str(site))
        else:
            plugin = ["-p", "beanie_tasks.pytest_plugin"]
    monkeypatch.setenv("MONGODB_URI", server_uri)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    result = pytester.runpytest_subprocess(*plugin, "-p", "no:cacheprovider", "-q", timeout=240)
    result.assert_outcomes(passed=6)
