"""The ``beanie-tasks`` command line: run workers, look at and repair queues, start a dev server.

Every failure is one line on stderr and exit code 1 (2 for a usage error), never a
traceback; MongoDB credentials never reach the output. Set ``BEANIE_TASKS_DEBUG=1`` to
see the traceback of an unexpected error.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import signal
import socket
import sys
import time
import urllib.parse
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from beanie import init_beanie
from bson import ObjectId
from bson.errors import InvalidId
from pydantic import ValidationError
from pymongo.errors import (
    ConfigurationError,
    InvalidURI,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)
from rich.console import Console
from rich.measure import Measurement
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

import beanie_tasks
from beanie_tasks import clock, driver, logs, store
from beanie_tasks.admin import RequeueReport
from beanie_tasks.discovery import (
    DiscoveryError,
    discover,
    documents_in,
    find_class,
    import_modules,
    imported_from_elsewhere,
    load_callable,
)
from beanie_tasks.errors import TaskError
from beanie_tasks.redact import scrub, secrets_in
from beanie_tasks.schedule import Schedule, ScheduleError, schedule_key, scheduled_classes
from beanie_tasks.states import IN_FLIGHT_STATES, State
from beanie_tasks.task import Task, as_utc, utcnow

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
DEFAULT_TIMEOUT = 5.0
DEV_DATABASE = "beanie_tasks"

app = typer.Typer(
    name="beanie-tasks",
    help="Run beanie-tasks workers and look after their queues.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
T = TypeVar("T")


def installed_version() -> str:
    """The installed distribution's version, or the package's own when it runs from a source tree."""
    try:
        return importlib.metadata.version("beanie-tasks")
    except importlib.metadata.PackageNotFoundError:
        return beanie_tasks.__version__


def _print_version(wanted: bool) -> None:
    if wanted:
        out.print(f"beanie-tasks {installed_version()}", markup=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Run beanie-tasks workers and look after their queues."""


# ------------------------------------------------------------------ errors


class CliError(Exception):
    """A failure to report as one line (already phrased for the operator)."""


# The password of the URI in use, also scrubbed where it appears outside a URI.
_secrets: list[str] = []


def redact(text: str) -> str:
    """``text`` as the CLI may print it: ``beanie_tasks.redact``'s policy, plus the known secrets."""
    return scrub(text, _secrets)


def fail(message: str) -> NoReturn:
    err.print(f"error: {redact(message)}", style="red", markup=False, soft_wrap=True)
    raise typer.Exit(EXIT_ERROR)


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main`` in a fresh event loop, turning every failure into one line and exit 1."""
    try:
        return asyncio.run(main())
    except typer.Exit:
        raise
    except typer.Abort:  # a question went unanswered (no terminal, end of input)
        fail("aborted; nothing was changed")
    except (CliError, DiscoveryError, ScheduleError, TaskError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        err.print("interrupted", style="yellow")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except PyMongoError as exc:
        fail(f"database error: {type(exc).__name__}: {exc}")
    except Exception as exc:
        if os.environ.get("BEANIE_TASKS_DEBUG"):
            raise
        fail(f"unexpected {type(exc).__name__}: {exc} (set BEANIE_TASKS_DEBUG=1 for the traceback)")


# -------------------------------------------------------------- connection

UriOption = Annotated[
    str | None,
    typer.Option("--uri", envvar="MONGODB_URI", show_default=False, help="MongoDB connection string."),
]
DatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--database",
        "-d",
        envvar="MONGODB_DATABASE",
        show_default=False,
        help="Database of the task collections (default: the database named in the URI).",
    ),
]
TimeoutOption = Annotated[
    float,
    typer.Option("--timeout", min=0.1, help="Seconds to wait for the server before giving up."),
]
ModulesOption = Annotated[
    list[str] | None,
    typer.Option(
        "--module",
        "-m",
        envvar="BEANIE_TASKS_MODULES",
        show_default=False,
        help="Module defining task classes (repeatable; the env var takes several, space-separated).",
    ),
]


def database_in(uri: str) -> str | None:
    """The database named in the URI's path (``mongodb://host/NAME?...``), if any."""
    match = re.match(r"mongodb(?:\+srv)?://[^/?]*/([^?]*)", uri, re.IGNORECASE)
    name = urllib.parse.unquote(match[1]) if match else ""
    return name or None


@dataclass(frozen=True)
class Connection:
    uri: str
    database: str
    timeout: float

    @classmethod
    def resolve(cls, uri: str | None, database: str | None, timeout: float) -> Connection:
        if not uri:
            fail("no MongoDB URI: pass --uri or set MONGODB_URI (beanie-tasks dev-server starts a local one)")
        _secrets[:] = secrets_in(uri)
        if not re.match(r"mongodb(?:\+srv)?://", uri, re.IGNORECASE):
            fail("invalid MongoDB URI: it must start with mongodb:// or mongodb+srv://")
        name = database or database_in(uri)
        if not name:
            fail("no database: pass --database, set MONGODB_DATABASE, or name one in the URI path")
        return cls(uri, name, timeout)

    async def open(self, classes: Sequence[type[Task]]) -> Any:
        """A client that answered a ping, with Beanie initialised on ``classes``."""
        try:
            client = driver.client_for(
                self.uri,
                serverSelectionTimeoutMS=int(self.timeout * 1000),
                connectTimeoutMS=int(self.timeout * 1000),
                appname="beanie-tasks",
            )
        except (InvalidURI, ConfigurationError, ValueError, TypeError) as exc:
            raise CliError(f"invalid MongoDB URI {self.uri}: {exc}") from None
        try:
            await client.admin.command("ping")
            await init_beanie(database=client[self.database], document_models=list(classes))
        except ServerSelectionTimeoutError:
            await driver.close_client(client)
            raise CliError(f"cannot reach MongoDB at {self.uri} within {self.timeout:g} s") from None
        except OperationFailure as exc:
            await driver.close_client(client)
            if exc.code == 18:
                raise CliError(f"authentication failed for {self.uri}") from None
            raise CliError(f"MongoDB refused: {exc}") from None
        except BaseException:
            await driver.close_client(client)
            raise
        return client


@contextmanager
def spinner(description: str) -> Iterator[None]:
    """Show that a long operation is alive (on stderr, so stdout stays clean for scripts)."""
    if not err.is_terminal:
        yield
        return
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=True
    ) as progress:
        progress.add_task(description, total=None)
        yield


async def with_classes(
    modules: Sequence[str] | None,
    connection: Connection,
    action: Callable[[list[type[Task]]], Awaitable[T]],
) -> T:
    """Import ``modules``, connect, run ``action`` with the task classes, close the client."""
    if not modules:
        raise CliError(
            "no task modules given: pass --module/-m myapp.tasks (repeatable) or set BEANIE_TASKS_MODULES "
            "(several modules separated by spaces)"
        )
    classes = discover(list(modules))
    client = await connection.open(classes)
    try:
        return await action(classes)
    finally:
        await driver.close_client(client)


# ------------------------------------------------------------------ worker


def _has_run(task_class: type[Task]) -> bool:
    return any("run" in vars(k) for k in task_class.__mro__ if k is not Task and issubclass(k, Task))


@app.command()
def worker(
    modules: Annotated[
        list[str] | None,
        typer.Argument(
            envvar="BEANIE_TASKS_MODULES",
            show_default=False,
            help="Modules defining the task classes to run.",
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, help="Tasks run at once.")] = 10,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", show_default=False, help="Run only this class (repeatable)."),
    ] = None,
    grace_period: Annotated[
        float, typer.Option("--grace-period", min=0, help="Seconds running tasks get to finish on SIGTERM.")
    ] = 30.0,
    consumer_id: Annotated[
        str | None,
        typer.Option("--consumer-id", show_default=False, help="Name in the lease (default: host:pid)."),
    ] = None,
    schedules: Annotated[
        bool, typer.Option("--schedules/--no-schedules", help="Also schedule the periodic classes.")
    ] = True,
    partition: Annotated[
        list[str] | None,
        typer.Option(
            "--partition",
            show_default=False,
            help="Claim only tasks whose partition_by field has this value (repeatable; values are strings).",
        ),
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="Level of beanie_tasks' own lines: DEBUG, INFO, WARNING or ERROR.")
    ] = "INFO",
    driver_log_level: Annotated[
        str, typer.Option("--driver-log-level", help="Level of the MongoDB driver's loggers (pymongo, motor).")
    ] = "WARNING",
    log_format: Annotated[str, typer.Option("--log-format", help="text, or json for one JSON object a line.")] = "text",
    setup: Annotated[
        list[str] | None,
        typer.Option(
            "--setup",
            show_default=False,
            help="module:function called with the worker at startup (repeatable); a generator function's code "
            "after its yield runs at shutdown.",
        ),
    ] = None,
    register_documents: Annotated[
        bool,
        typer.Option(
            "--register-documents/--no-register-documents",
            help="Also initialise every other Beanie Document found in MODULES.",
        ),
    ] = True,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            show_default=False,
            help="Serve /metrics, /healthz and /readyz on this port (needs the metrics extra).",
        ),
    ] = None,
    metrics_host: Annotated[str, typer.Option("--metrics-host", help="Address the metrics server binds.")] = "0.0.0.0",
    tracing: Annotated[
        bool, typer.Option("--tracing/--no-tracing", help="OpenTelemetry spans for runs (needs the otel extra).")
    ] = False,
    uri: UriOption = None,
    database: DatabaseOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Run the tasks of MODULES until SIGTERM or Ctrl-C (a second one exits at once)."""
    from beanie_tasks.worker import Worker

    if not modules:
        fail(
            "no task modules given: name them (beanie-tasks worker myapp.tasks) or set BEANIE_TASKS_MODULES "
            "(several modules separated by spaces)"
        )
    connection = Connection.resolve(uri, database, timeout)
    try:
        level, driver_level = logs.parse_level(log_level), logs.parse_level(driver_log_level)
        if log_format not in logs.FORMATS:
            raise ValueError(f"unknown log format {log_format!r}; use {' or '.join(logs.FORMATS)}")
    except ValueError as exc:
        fail(str(exc))

    async def main() -> None:
        classes = discover(modules)
        chosen = [find_class(classes, name) for name in only] if only else classes
        runnable = [cls for cls in chosen if _has_run(cls)]
        if not runnable:
            raise CliError(f"no task class with a run() method in {', '.join(modules)}")
        for line in imported_from_elsewhere(modules, runnable):
            err.print(f"warning: {line}", style="yellow", markup=False, soft_wrap=True)
        startup = [load_callable(spec) for spec in setup or []]
        documents = documents_in(import_modules(modules)) if register_documents else []
        client = await connection.open([*classes, *documents])
        try:
            if schedules:
                scheduled_classes(runnable)  # a periodic class that cannot build its task fails here, once
            logs.configure(level, driver_level=driver_level, fmt=log_format, secrets=_secrets)
            try:
                runner = Worker(
                    runnable,
                    concurrency=concurrency,
                    consumer_id=consumer_id,
                    grace_period=grace_period,
                    schedules=schedules,
                    partitions=partition or None,
                    on_startup=startup,
                )
            except ValueError as exc:
                raise CliError(str(exc)) from None
            if tracing:
                _trace(runner)
            server = None
            if metrics_port is not None:  # 0 picks a free port
                server = _serve_metrics(runner, metrics_host, metrics_port, log_format)
            runner.install_signal_handlers()
            names = ", ".join(cls.__name__ for cls in runnable)
            pinned = f", partitions {', '.join(partition)}" if partition else ""
            started = f"worker {runner.consumer_id}: {names} on {connection.database}"
            _announce(f"{started} (concurrency {concurrency}{pinned})", log_format)
            try:
                await runner.run()
            finally:
                if server is not None:
                    server.close()
        finally:
            await driver.close_client(client)

    run(main)


def _announce(text: str, log_format: str) -> None:
    """A line for the operator on stderr: a log record when logs are JSON, so every line parses."""
    if log_format == "json":
        logs.cli_log.info("%s", redact(text))
    else:
        err.print(redact(text), markup=False, soft_wrap=True)


def _serve_metrics(runner: Any, host: str, port: int, log_format: str) -> Any:
    """Count the worker's runs in the default registry (with the process metrics) and serve it."""
    try:
        import prometheus_client

        from beanie_tasks.metrics import Metrics, serve
    except ImportError:
        raise CliError("--metrics-port needs prometheus-client: pip install 'beanie-tasks[metrics]'") from None
    metrics = Metrics(prometheus_client.REGISTRY)
    metrics.attach(runner)
    try:
        server = serve(metrics, runner, host=host, port=port)
    except OSError as exc:
        raise CliError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    _announce(f"metrics on http://{host}:{server.port}/metrics (health: /healthz, /readyz)", log_format)
    return server


def _trace(runner: Any) -> None:
    try:
        from beanie_tasks.tracing import Tracing
    except ImportError:
        raise CliError("--tracing needs opentelemetry-api: pip install 'beanie-tasks[otel]'") from None
    Tracing().attach(runner)


# ------------------------------------------------------------------ status


async def oldest_ready(task_class: type[Task], now: datetime) -> datetime | None:
    return await task_class.task_store().oldest_ready(now)


@app.command()
def status(
    module: ModulesOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    uri: UriOption = None,
    database: DatabaseOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Counts per class and state, the age of the oldest ready task, and periodic schedules."""
    connection = Connection.resolve(uri, database, timeout)

    async def collect(classes: list[type[Task]]) -> list[dict[str, Any]]:
        rows = []
        now = clock.now(classes[0].collection()) if classes else utcnow()
        for cls in classes:
            counts = await cls.counts()
            oldest = await oldest_ready(cls, now)
            row: dict[str, Any] = {"class": cls.__name__, "collection": cls.collection().name}
            row |= {state.value: counts[state] for state in State}
            row["oldest_ready_seconds"] = round((now - oldest).total_seconds(), 3) if oldest else None
            schedule = Schedule.of(cls)
            if schedule is not None:
                cursor = await store.schedule_cursor(cls.collection(), schedule_key(cls))
                last = cursor.get("last_slot") if cursor else None
                row["schedule"] = schedule.describe()
                row["last_slot"] = as_utc(last).isoformat() if isinstance(last, datetime) else None
                row["next_slot"] = schedule.following(now).isoformat()
            rows.append(row)
        return rows

    with spinner("counting tasks"):
        rows = run(lambda: with_classes(module, connection, collect))
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title=redact(f"tasks in {connection.database}"))
    table.add_column("class", no_wrap=True, min_width=longest_name(rows))
    for state in State:
        table.add_column(state.value, justify="right", min_width=len(state.value))
    table.add_column("oldest ready", justify="right", min_width=len("oldest"))
    for row in rows:
        ready = row["oldest_ready_seconds"]
        oldest = clock.short_age(ready) if ready is not None else "-"
        table.add_row(row["class"], *(str(row[s.value]) for s in State), oldest)
    print_whole(table)
    periodic = [row for row in rows if "schedule" in row]
    if periodic:
        schedules_table = Table(title="periodic classes")
        schedules_table.add_column("class", no_wrap=True, min_width=longest_name(periodic))
        for column in ("schedule", "last slot", "next slot"):
            schedules_table.add_column(column, no_wrap=True)
        for row in periodic:
            schedules_table.add_row(row["class"], row["schedule"], row["last_slot"] or "never", row["next_slot"])
        print_whole(schedules_table)


def longest_name(rows: Sequence[dict[str, Any]]) -> int:
    return max((len(row["class"]) for row in rows), default=5)


def print_whole(table: Table) -> None:
    """Print ``table`` without cutting a cell: wider than the terminal when it must be."""
    needed = Measurement.get(out, out.options, table).minimum
    out.print(table, width=max(out.width, needed), crop=False)


# ------------------------------------------------------- one task by id


def parse_id(task_id: str) -> ObjectId:
    try:
        return ObjectId(task_id)
    except (InvalidId, TypeError):
        fail(f"{task_id!r} is not a task id (24 hexadecimal characters)")


async def find_task(classes: Sequence[type[Task]], task_id: ObjectId) -> tuple[type[Task], dict[str, Any]]:
    """The class whose collection holds ``task_id``, and the raw document (even a malformed one)."""
    seen = set()
    for cls in classes:
        collection = cls.collection()
        if collection.name in seen:
            continue
        seen.add(collection.name)
        document = await store.read_task(collection, task_id)
        if document is not None:
            return own_class(classes, cls, document), document
    names = ", ".join(sorted(seen))
    raise CliError(f"no task with id {task_id} in {names}")


def own_class(classes: Sequence[type[Task]], found_by: type[Task], document: dict[str, Any]) -> type[Task]:
    """The most specific of ``classes`` that owns ``document`` in its collection (a subclass over
    its root), so a task is shown, cancelled and validated as what it is."""
    owners = [
        cls
        for cls in classes
        if cls.collection().name == found_by.collection().name and cls.task_store().owns(document)
    ]
    return max(owners, key=lambda cls: len(cls.__mro__), default=found_by)


def plain(value: Any) -> Any:
    """A JSON-friendly copy of a stored value."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, datetime):
        return as_utc(value).isoformat()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


@app.command()
def inspect(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="The task's id.", show_default=False)],
    module: ModulesOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    uri: UriOption = None,
    database: DatabaseOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Show every stored field of one task."""
    wanted = parse_id(task_id)
    connection = Connection.resolve(uri, database, timeout)
    cls, document = run(lambda: with_classes(module, connection, lambda classes: find_task(classes, wanted)))
    fields = plain(document)
    if as_json:
        out.print_json(json.dumps(fields))
        return
    table = Table(title=f"{cls.__name__} {wanted}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in fields.items():
        text = value if isinstance(value, str) else json.dumps(value)
        table.add_row(name, redact(text))
    out.print(table)


@app.command()
def cancel(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="The task's id.", show_default=False)],
    module: ModulesOption = None,
    uri: UriOption = None,
    database: DatabaseOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Cancel a CREATED or RUNNING task (a worker running it stops within a heartbeat)."""
    wanted = parse_id(task_id)
    connection = Connection.resolve(uri, database, timeout)

    async def act(classes: list[type[Task]]) -> tuple[str, str]:
        cls, document = await find_task(classes, wanted)
        try:
            task = cls.model_validate(document)
        except ValidationError:  # a malformed document can still be cancelled by id
            task = cls.model_construct(id=wanted)
        if await task.cancel():
            return cls.__name__, ""
        current = await store.read_task(cls.collection(), wanted)
        return cls.__name__, str((current or document).get("state"))

    name, ended = run(lambda: with_classes(module, connection, act))
    if ended:
        fail(f"{name} {wanted} was not cancelled: it is already {ended}")
    out.print(f"cancelled {name} {wanted}")


# ------------------------------------------------------------ bulk admin


@app.command("requeue-failed")
def requeue_failed(
    class_name: Annotated[str, typer.Argument(metavar="CLASS", help="Task class name.", show_default=False)],
    with_dependents: Annotated[
        bool,
        typer.Option("--with-dependents", help="Also requeue the dependents that failed because these tasks failed."),
    ] = False,
    module: ModulesOption = None,
    uri: UriOption = None,
    database: DatabaseOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Give every FAILED task of CLASS a fresh set of attempts; say which stay FAILED and why."""
    connection = Connection.resolve(uri, database, timeout)

    async def act(classes: list[type[Task]]) -> tuple[str, RequeueReport]:
        cls = find_class(classes, class_name)
        return cls.__name__, await cls.requeue_failed_report(with_dependents=with_dependents)

    with spinner(f"requeueing failed {class_name} tasks"):
        name, report = run(lambda: with_classes(module, connection, act))
    out.print(f"requeued {report.requeued} FAILED {name} task(s)", markup=False)
    if with_dependents:
        out.print(f"requeued {report.dependents} dependent task(s) with them, waiting for their links", markup=False)
    if report.skipped:
        out.print(f"skipped {report.skipped_total} FAILED task(s):", markup=False)
        for reason, count in sorted(report.skipped.items(), key=lambda item: -item[1]):
            out.print(redact(f"  {count} {reason}"), markup=False, soft_wrap=True)


def parse_states(values: Sequence[str]) -> list[State]:
    states = []
    for value in values:
        for part in value.split(","):
            try:
                states.append(State(part.strip().upper()))
            except ValueError:
                fail(f"unknown state {part!r}; use {', '.join(s.value for s in State)}")
    return states


@app.command()
def purge(
    class_name: Annotated[str, typer.Argument(metavar="CLASS", help="Task class name.", show_default=False)],
    state: Annotated[
        list[str],
        typer.Option("--state", "-s", show_default=False, help="State to delete (repeatable or comma-separated)."),
    ],
    force: Annotated[bool, typer.Option("--force", help="Allow deleting CREATED and RUNNING tasks.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    module: ModulesOption = None,
    uri: UriOption = None,
    database: DatabaseOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Delete the tasks of CLASS in the given states (CREATED and RUNNING also need --force)."""
    states = parse_states(state)
    live = sorted(s.value for s in set(states) & IN_FLIGHT_STATES)
    if live and not force:
        fail(f"refusing to delete in-flight tasks ({', '.join(live)}) without --force")
    connection = Connection.resolve(uri, database, timeout)
    names = ", ".join(sorted({s.value for s in states}))

    async def act(classes: list[type[Task]]) -> tuple[str, int]:
        cls = find_class(classes, class_name)
        if not yes:
            counts = await cls.counts()
            matching = sum(counts[s] for s in set(states))
            if matching == 0:
                return cls.__name__, 0
            if not typer.confirm(f"Delete {matching} {cls.__name__} task(s) in {names}?", err=True):
                raise CliError("purge aborted; nothing was deleted")
        with spinner(f"deleting {names} {cls.__name__} tasks"):
            return cls.__name__, await cls.purge(states, force=force)

    name, count = run(lambda: with_classes(module, connection, act))
    out.print(f"deleted {count} {name} task(s) in {names}")


# --------------------------------------------------------------- dashboard


@app.command("dashboard")
def dashboard_command(
    modules: Annotated[
        list[str],
        typer.Argument(envvar="BEANIE_TASKS_MODULES", show_default=False, help="Modules defining the task classes."),
    ],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535, help="Port to listen on.")] = 8080,
    read_only: Annotated[bool, typer.Option("--read-only", help="Show the queues; offer no action.")] = False,
    uri: UriOption = None,
    database: DatabaseOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Serve the web dashboard of MODULES until Ctrl-C (needs the web extra)."""
    try:
        import uvicorn

        from beanie_tasks.web import dashboard
    except ImportError as exc:
        fail(f"the dashboard needs the web extra ({exc.name} is missing): pip install 'beanie-tasks[web]'")
    connection = Connection.resolve(uri, database, timeout)
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            fail(f"cannot listen on {host}:{port}: {exc.strerror}")

    async def main() -> None:
        classes = discover(modules)
        client = await connection.open(classes)
        try:
            config = uvicorn.Config(dashboard(classes, read_only=read_only), host=host, port=port, log_level="warning")
            names = ", ".join(cls.__name__ for cls in classes)
            mode = " (read-only)" if read_only else ""
            err.print(redact(f"dashboard of {names} on {connection.database}{mode}: http://{host}:{port}/"))
            await uvicorn.Server(config).serve()
        finally:
            await driver.close_client(client)

    run(main)


# -------------------------------------------------------------- dev-server


@app.command("dev-server")
def dev_server(
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port (0 picks a free one).")] = 0,
    storage_path: Annotated[
        str | None,
        typer.Option(
            "--storage-path",
            show_default=False,
            help="Keep the data in this directory, synced on every commit (default: memory).",
        ),
    ] = None,
    database: Annotated[
        str, typer.Option("--database", "-d", help="Database named in the printed URI.")
    ] = DEV_DATABASE,
) -> None:
    """Start an embedded SecantusDB on 127.0.0.1 for local work; stops on Ctrl-C."""
    from beanie_tasks.embedded import EmbeddedServer, EmbeddedServerError, free_port

    server = EmbeddedServer(port=port or free_port(), storage_path=storage_path)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            server.start()
        except EmbeddedServerError as exc:
            fail(str(exc))
        uri = server.uri.replace("/?", f"/{urllib.parse.quote(database)}?", 1)
        kept = f"data in {storage_path}, synced on every commit" if server.syncs_on_commit else "data in memory"
        out.print(
            f"SecantusDB (GPL-2.0) listening on 127.0.0.1:{server.port} ({kept}); Ctrl-C stops it",
            markup=False,
            soft_wrap=True,
        )
        out.print(f"export MONGODB_URI='{uri}'", soft_wrap=True)
        sys.stdout.flush()
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.2)
        code = server.process.returncode if server.process is not None else None
        fail(f"the embedded server exited unexpectedly (code {code})")
    except KeyboardInterrupt:
        err.print("stopping the embedded server")
    finally:
        server.close()
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# ------------------------------------------------------------------- entry


def _warn(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    err.print(f"warning: {redact(str(message))}", style="yellow", markup=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    warnings.showwarning = _warn
    app()


__all__ = ["app", "main"]


if __name__ == "__main__":
    main()
