"""The ``beanie-tasks`` command line: run workers, look at and repair queues, start a dev server.

Every failure is one line on stderr and exit code 1 (2 for a usage error), never a
traceback; MongoDB credentials never reach the output. Set ``BEANIE_TASKS_DEBUG=1`` to
see the traceback of an unexpected error.
"""

from __future__ import annotations

import asyncio
import json
import logging
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
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from beanie_tasks import clock, driver, store
from beanie_tasks.discovery import DiscoveryError, discover, find_class
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
    classes = discover(list(modules or []))
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
        list[str],
        typer.Argument(
            envvar="BEANIE_TASKS_MODULES",
            show_default=False,
            help="Modules defining the task classes to run.",
        ),
    ],
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
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
    uri: UriOption = None,
    database: DatabaseOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Run the tasks of MODULES until SIGTERM or Ctrl-C (a second one exits at once)."""
    from beanie_tasks.worker import Worker

    connection = Connection.resolve(uri, database, timeout)
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        fail(f"unknown log level {log_level!r}; use DEBUG, INFO, WARNING or ERROR")

    async def main() -> None:
        classes = discover(modules)
        chosen = [find_class(classes, name) for name in only] if only else classes
        runnable = [cls for cls in chosen if _has_run(cls)]
        if not runnable:
            raise CliError(f"no task class with a run() method in {', '.join(modules)}")
        client = await connection.open(classes)
        try:
            if schedules:
                scheduled_classes(runnable)  # a periodic class that cannot build its task fails here, once
            _log_to_stderr(level)
            try:
                runner = Worker(
                    runnable,
                    concurrency=concurrency,
                    consumer_id=consumer_id,
                    grace_period=grace_period,
                    schedules=schedules,
                    partitions=partition or None,
                )
            except ValueError as exc:
                raise CliError(str(exc)) from None
            runner.install_signal_handlers()
            names = ", ".join(cls.__name__ for cls in runnable)
            pinned = f", partitions {', '.join(partition)}" if partition else ""
            started = f"worker {runner.consumer_id}: {names} on {connection.database}"
            err.print(redact(f"{started} (concurrency {concurrency}{pinned})"))
            await runner.run()
        finally:
            await driver.close_client(client)

    run(main)


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def _log_to_stderr(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# ------------------------------------------------------------------ status


def age(seconds: float) -> str:
    """``95`` -> ``1m 35s``: short, for tables."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(hours) + [f"{minutes}m"] * bool(minutes)
    return " ".join([*parts, f"{secs}s"][:2])


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
    table.add_column("class")
    for state in State:
        table.add_column(state.value, justify="right")
    table.add_column("oldest ready", justify="right")
    for row in rows:
        ready = row["oldest_ready_seconds"]
        table.add_row(row["class"], *(str(row[s.value]) for s in State), age(ready) if ready is not None else "-")
    out.print(table)
    periodic = [row for row in rows if "schedule" in row]
    if periodic:
        schedules_table = Table(title="periodic classes")
        for column in ("class", "schedule", "last slot", "next slot"):
            schedules_table.add_column(column)
        for row in periodic:
            schedules_table.add_row(row["class"], row["schedule"], row["last_slot"] or "-", row["next_slot"])
        out.print(schedules_table)


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
            return cls, document
    names = ", ".join(sorted(seen))
    raise CliError(f"no task with id {task_id} in {names}")


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
    module: ModulesOption = None,
    uri: UriOption = None,
    database: DatabaseOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Give every FAILED task of CLASS a fresh set of attempts."""
    connection = Connection.resolve(uri, database, timeout)

    async def act(classes: list[type[Task]]) -> tuple[str, int]:
        cls = find_class(classes, class_name)
        return cls.__name__, await cls.requeue_failed()

    with spinner(f"requeueing failed {class_name} tasks"):
        name, count = run(lambda: with_classes(module, connection, act))
    out.print(f"requeued {count} FAILED {name} task(s)")


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
