"""Helpers for testing code that uses beanie-tasks: a server, a fresh database, ``run_now``, a command counter.

The fixtures reach your tests through the ``beanie_tasks`` pytest plugin, which
installing the package registers: no import in ``conftest.py`` is needed.
``mongodb_uri`` is ``MONGODB_URI`` when set, else an embedded SecantusDB server
started once per test session (needs the ``server`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar

import pytest
import pytest_asyncio
from beanie import init_beanie
from pydantic import ValidationError
from pymongo import monitoring

from beanie_tasks.admin import set_aside
from beanie_tasks.clock import FAR_FUTURE, as_utc
from beanie_tasks.discovery import import_modules, task_classes_in
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.embedded import EmbeddedServer
from beanie_tasks.errors import TransitionError
from beanie_tasks.states import State
from beanie_tasks.store import read_task
from beanie_tasks.task import Task, model_for, quarantine_reason
from beanie_tasks.worker import Worker

# Commands the driver sends on its own, which say nothing about an operation's cost.
BACKGROUND_COMMANDS = frozenset(
    {"hello", "ismaster", "isMaster", "ping", "endSessions", "saslStart", "saslContinue", "buildInfo", "killCursors"}
)


class CommandCounter(monitoring.CommandListener):
    """Counts the commands a client sends, by name, leaving out handshakes and heartbeats."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.targets: list[str] = []  # the collection each command named ("" when none)
        self.last: dict[str, Mapping[str, Any]] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name not in BACKGROUND_COMMANDS:
            self.commands.append(event.command_name)
            target = event.command.get(event.command_name)
            self.targets.append(target if isinstance(target, str) else "")
            self.last[event.command_name] = event.command

    def on(self, collection: str) -> Counter[str]:
        """The commands sent to one collection, by name."""
        return Counter(name for name, target in zip(self.commands, self.targets, strict=True) if target == collection)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def reset(self) -> None:
        self.commands.clear()
        self.targets.clear()
        self.last.clear()

    @property
    def total(self) -> int:
        return len(self.commands)

    def by_name(self) -> Counter[str]:
        return Counter(self.commands)


@pytest.fixture(scope="session")
def mongodb_uri() -> Iterator[str]:
    """A server for the whole session: ``MONGODB_URI``, else a fresh embedded SecantusDB."""
    configured = os.environ.get("MONGODB_URI")
    if configured:
        yield configured
        return
    with EmbeddedServer(ttl_sweep_seconds=1.0) as server:
        yield server.uri


# The ini option naming the modules whose task classes ``task_database`` initialises.
MODELS_OPTION = "beanie_tasks_models"
LoopScope = Literal["function", "class", "module", "package", "session"]
LOOP_SCOPES: tuple[LoopScope, ...] = ("function", "class", "module", "package", "session")


@pytest.fixture
def task_models(request: pytest.FixtureRequest) -> list[type[Task]]:
    """The task classes ``task_database`` passes to ``init_beanie``: those in the ``beanie_tasks_models`` modules.

    Set ``beanie_tasks_models = myapp.tasks`` in your pytest configuration, or define a
    ``task_models`` fixture of your own that returns the classes.
    """
    try:
        names: list[str] = request.config.getini(MODELS_OPTION)
    except ValueError:  # the plugin, which declares the option, is not loaded
        names = []
    return task_classes_in(import_modules(names)) if names else []


@contextlib.asynccontextmanager
async def fresh_database(uri: str, models: Sequence[type[Task]] = ()) -> AsyncIterator[Any]:
    """A uniquely named database on ``uri``, with ``models`` initialised on it, dropped at the end."""
    client = client_for(uri, serverSelectionTimeoutMS=10_000)
    name = f"bt_test_{uuid.uuid4().hex[:12]}"
    try:
        database = client[name]
        if models:
            await init_beanie(database=database, document_models=list(models))
        yield database
    finally:
        await client.drop_database(name)
        await close_client(client)


def database_in_loop(loop_scope: LoopScope) -> Any:
    """A ``task_database`` variant whose client lives in the event loop of ``loop_scope``."""

    @pytest_asyncio.fixture(loop_scope=loop_scope)
    async def database(mongodb_uri: str, task_models: list[type[Task]]) -> AsyncIterator[Any]:
        async with fresh_database(mongodb_uri, task_models) as db:
            yield db

    return database


# One per loop scope; ``task_database`` picks the one in the test's own loop (a client
# made in another loop fails with "Cannot use AsyncMongoClient in different event loop").
task_database_in_function_loop = database_in_loop("function")
task_database_in_class_loop = database_in_loop("class")
task_database_in_module_loop = database_in_loop("module")
task_database_in_package_loop = database_in_loop("package")
task_database_in_session_loop = database_in_loop("session")


def loop_scope_of(request: pytest.FixtureRequest) -> str:
    """The loop scope a test runs in: its ``asyncio`` marker's, else pytest-asyncio's configured default."""
    marker = request.node.get_closest_marker("asyncio")
    scope = (marker.kwargs.get("loop_scope") or marker.kwargs.get("scope")) if marker is not None else None
    if scope is None:
        try:
            scope = request.config.getini("asyncio_default_test_loop_scope") or "function"
        except ValueError:  # an older pytest-asyncio, where tests always run in the function's loop
            scope = "function"
    if scope not in LOOP_SCOPES:
        raise pytest.UsageError(f"unknown asyncio loop scope {scope!r}; expected one of {', '.join(LOOP_SCOPES)}")
    return str(scope)


@pytest.fixture
def task_database(request: pytest.FixtureRequest) -> Any:
    """A uniquely named database with ``task_models`` initialised on it, dropped after the test.

    Its client is made in the test's own event loop, whatever the test's ``loop_scope``.
    """
    return request.getfixturevalue(f"task_database_in_{loop_scope_of(request)}_loop")


T = TypeVar("T", bound=Task)


async def run_now(task: T, *, worker: Worker | None = None) -> T:
    """Claim ``task`` and run it once exactly as a worker would, and return it holding the outcome.

    The claim, lease, heartbeats, progress, timeout, result and retry policy are the
    worker's own (``Worker.run_claimed``). A run() that raises leaves the task FAILED,
    or CREATED for a retry, with ``error`` set, as in production. Raises TransitionError
    when the task cannot be claimed now, or when its stored document is malformed (it is
    then set aside FAILED with the reason, as a worker would).
    """
    if not isinstance(task, Task):
        raise TypeError(f"run_now takes a pushed task (an instance of a Task subclass), got {task!r}")
    task_class = type(task)
    name = f"{task_class.__name__} {task.id}"
    if task.id is None:
        raise TransitionError(f"cannot run a {task_class.__name__} that was never pushed: push() it first")
    runner = worker or Worker([task_class], concurrency=1, schedules=False, use_change_stream=False)
    task_store = task_class.task_store()
    document = await task_store.claim_task(runner.consumer_id, task.id, task.partition_value)
    if document is None:
        raise TransitionError(f"cannot run {name} now: {await why_not_claimable(task_class, task.id)}")
    try:
        claimed = model_for(task_class, document).model_validate(document)
    except ValidationError as exc:  # set aside FAILED, as a worker's claim would, rather than left RUNNING
        reason = quarantine_reason(task_class, exc)
        await set_aside(task_store, document, reason)
        raise TransitionError(f"cannot run {name}: {reason}") from None
    await runner.run_claimed(claimed)
    return claimed


async def why_not_claimable(task_class: type[Task], task_id: Any) -> str:
    """Why the claim of one task matched nothing, in words."""
    document = await read_task(task_class.collection(), task_id)
    if document is None:
        return "no such task (was it pushed to this database, and not purged?)"
    state = document.get("state")
    if state != State.CREATED.value:
        return f"it is {state}, not CREATED"
    run_at = document.get("run_at")
    if isinstance(run_at, datetime):
        if as_utc(run_at) >= FAR_FUTURE:
            return "it is waiting for its dependencies"
        return f"it is scheduled for {as_utc(run_at).isoformat()}"
    return "it is not claimable (its document does not match the claim filter)"


async def eventually(probe: Callable[[], Awaitable[Any]], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Await ``probe()`` until it returns something truthy, and return that; fail after ``timeout`` seconds.

    Tests wait on conditions, never on a fixed sleep, so they stay correct on a slow machine.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = await probe()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@contextlib.asynccontextmanager
async def running(worker: Worker, *, stop_timeout: float = 20.0) -> AsyncIterator[Worker]:
    """Run ``worker`` in the background for the block, then stop it and wait for its drain."""
    stop = asyncio.Event()
    job = asyncio.create_task(worker.run(stop))
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(job, stop_timeout)
