"""The CLI as a shell user meets it: ``--version``, an 80-column ``status``, and one-line errors and warnings."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

import beanie_tasks
from beanie_tasks.embedded import free_port
from tests.conftest import Backend

LONG_NAME = "NightlyInvoiceExportForEveryTenantInTheEuropeanRegion"

APP_SOURCE = textwrap.dedent(
    f"""
    from beanie_tasks import Task


    class {LONG_NAME}(Task):
        async def run(self) -> None:
            return None


    class HourlyReport(Task):
        class TaskSettings:
            every = 3600

        async def run(self) -> None:
            return None
    """
)

UNBUILDABLE_SOURCE = textwrap.dedent(
    """
    from beanie_tasks import Task


    class TenantSync(Task):
        tenant: str

        class TaskSettings:
            every = 60

        async def run(self) -> None:
            return None
    """
)

REEXPORT_SOURCE = "from bt_gaps_app import HourlyReport  # noqa: F401\n"


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "bt_gaps_app.py").write_text(APP_SOURCE)
    (tmp_path / "bt_gaps_unbuildable.py").write_text(UNBUILDABLE_SOURCE)
    (tmp_path / "bt_gaps_reexport.py").write_text(REEXPORT_SOURCE)
    package = tmp_path / "bt_gaps_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from bt_gaps_pkg.jobs import Cleanup  # noqa: F401\n")
    (package / "jobs.py").write_text(APP_SOURCE.replace(LONG_NAME, "Cleanup"))
    return tmp_path


def cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m beanie_tasks.cli ...`` in a fresh process, 80 columns wide, as typed in a shell."""
    environment = {k: v for k, v in os.environ.items() if k not in ("MONGODB_URI", "BEANIE_TASKS_MODULES")}
    environment |= {"COLUMNS": "80", "PYTHONPATH": os.environ.get("PYTHONPATH", "")} | env
    return subprocess.run(
        [sys.executable, "-m", "beanie_tasks.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=environment,
        check=False,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_version_prints_the_installed_version() -> None:
    done = cli("--version")
    assert done.returncode == 0, done.stderr
    try:
        expected = importlib.metadata.version("beanie-tasks")
    except importlib.metadata.PackageNotFoundError:
        expected = beanie_tasks.__version__
    assert done.stdout.strip() == f"beanie-tasks {expected}"


def test_the_package_ships_its_type_marker() -> None:
    assert (Path(beanie_tasks.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize("command", [["status"], ["requeue-failed", "Email"], ["worker"]])
def test_no_modules_says_how_to_name_them(command: list[str]) -> None:
    line = one_line_error(cli(*command, MONGODB_URI="mongodb://127.0.0.1:1/db"))
    assert "no task modules given" in line and "BEANIE_TASKS_MODULES" in line
    if command[0] != "worker":  # the worker takes its modules as arguments
        assert "-m" in line


def test_worker_warns_about_task_classes_imported_from_elsewhere(app_dir: Path) -> None:
    uri = f"mongodb://127.0.0.1:{free_port()}/db"
    done = cli("worker", "bt_gaps_reexport", "--timeout", "0.5", cwd=app_dir, MONGODB_URI=uri)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[0] == (
        "warning: bt_gaps_reexport imports task classes defined elsewhere, and this worker runs them too: "
        "HourlyReport (defined in bt_gaps_app)"
    ), done.stderr
    assert done.returncode == 1 and "cannot reach MongoDB" in lines[1]
    for module in ("bt_gaps_app", "bt_gaps_pkg"):
        quiet = cli("worker", module, "--timeout", "0.5", cwd=app_dir, MONGODB_URI=uri)
        assert "cannot reach MongoDB" in quiet.stderr
        assert "warning" not in quiet.stderr, f"{module} defines its classes itself or in a submodule"


@pytest.mark.wire
def test_status_keeps_long_class_names_whole_and_says_never(backend: Backend, app_dir: Path) -> None:
    assert backend.uri is not None
    done = cli(
        "status", "-m", "bt_gaps_app", "-d", f"bt_gaps_{uuid.uuid4().hex[:8]}", cwd=app_dir, MONGODB_URI=backend.uri
    )
    assert done.returncode == 0, done.stderr
    assert LONG_NAME in done.stdout, done.stdout
    for header in ("CREATED", "RUNNING", "FINISHED", "FAILED", "CANCELLED"):
        assert header in done.stdout, f"the {header} header was cut"
    (schedule_row,) = [line for line in done.stdout.splitlines() if "HourlyReport" in line and "every" in line]
    assert "never" in schedule_row, "a schedule that never ran says so"


@pytest.mark.wire
def test_an_unbuildable_periodic_class_fails_in_one_line(backend: Backend, app_dir: Path) -> None:
    assert backend.uri is not None
    database = f"bt_gaps_{uuid.uuid4().hex[:8]}"
    line = one_line_error(cli("worker", "bt_gaps_unbuildable", "-d", database, cwd=app_dir, MONGODB_URI=backend.uri))
    assert "periodic task TenantSync cannot be built" in line and "tenant: Field required" in line
    assert "for_slot" in line and "pydantic.dev" not in line


SHARED_SOURCE = textwrap.dedent(
    """
    from beanie_tasks import Task


    class Job(Task):
        class Settings:
            is_root = True
            name = "jobs"


    class Invoice(Job):
        number: int

        async def run(self) -> None:
            return None


    class Refund(Job):
        amount: int = 0

        async def run(self) -> None:
            return None
    """
)

SHARED_PUSH = textwrap.dedent(
    """
    import asyncio, sys

    from beanie import init_beanie

    from beanie_tasks.driver import client_for
    from bt_gaps_shared import Invoice, Job, Refund


    async def main() -> None:
        client = client_for(sys.argv[1])
        await init_beanie(database=client[sys.argv[2]], document_models=[Job, Invoice, Refund])
        invoice = await Invoice(number=7).push()
        refund = await Refund(amount=3).push()
        print(invoice.id, refund.id)

    asyncio.run(main())
    """
)


@pytest.mark.wire
def test_inspect_and_cancel_name_the_subclass_in_a_shared_collection(backend: Backend, tmp_path: Path) -> None:
    """Classes sharing one collection (``is_root``): ``inspect`` and ``cancel`` name the task's own
    class, not the root's, and cancel acts on that one task only."""
    assert backend.uri is not None
    (tmp_path / "bt_gaps_shared.py").write_text(SHARED_SOURCE)
    (tmp_path / "bt_gaps_shared_push.py").write_text(SHARED_PUSH)
    database = f"bt_gaps_{uuid.uuid4().hex[:8]}"
    pushed = subprocess.run(
        [sys.executable, "bt_gaps_shared_push.py", backend.uri, database],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
        check=True,
    )
    invoice_id, refund_id = pushed.stdout.split()
    shown = cli("inspect", invoice_id, "-m", "bt_gaps_shared", "-d", database, cwd=tmp_path, MONGODB_URI=backend.uri)
    assert shown.returncode == 0, shown.stderr
    assert f"Invoice {invoice_id}" in shown.stdout, shown.stdout
    cancelled = cli("cancel", refund_id, "-m", "bt_gaps_shared", "-d", database, cwd=tmp_path, MONGODB_URI=backend.uri)
    assert cancelled.returncode == 0, cancelled.stderr
    assert "Refund" in cancelled.stdout and "Job" not in cancelled.stdout, cancelled.stdout
    status = cli("status", "-m", "bt_gaps_shared", "-d", database, "--json", cwd=tmp_path, MONGODB_URI=backend.uri)
    assert status.returncode == 0, status.stderr
    counts = {row["class"]: (row["CREATED"], row["CANCELLED"]) for row in json.loads(status.stdout)}
    assert counts == {"Job": (1, 1), "Invoice": (1, 0), "Refund": (0, 1)}, counts
