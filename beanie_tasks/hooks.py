"""Hooks: worker lifecycle (startup, shutdown), middleware around each run, and a hook on push.

Everything here is plain Python and optional: a worker without hooks calls none of it
and sends exactly the commands it always did. Hooks never send a command of their own,
and a hook that raises is logged and skipped: it cannot fail a task or stop a worker
(except ``on_startup``, whose failure stops the worker before it claims anything).

Middleware is an object with any of these methods, sync or async (see ``Middleware``):
``before_run(task)``, ``on_exception(task, error)`` and ``after_run(task, outcome)``
around each run in a worker, and ``before_push(task)`` / ``after_push(task, error)``
around each ``push()`` in this process (registered with ``add_push_middleware``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from beanie_tasks.errors import HookError
from beanie_tasks.redact import get_logger, redact_text

if TYPE_CHECKING:
    from beanie_tasks.task import Task

log = get_logger("beanie_tasks.hooks")

# What an outcome's ``status`` can be.
FINISHED = "finished"
RETRYING = "retrying"
FAILED = "failed"
CANCELLED = "cancelled"
RELEASED = "released"
LEASE_LOST = "lease lost"
NOT_RECORDED = "not recorded"
STATUSES = (FINISHED, RETRYING, FAILED, CANCELLED, RELEASED, LEASE_LOST, NOT_RECORDED)


@dataclass
class Outcome:
    """How one run ended, as ``after_run`` sees it.

    ``status`` is one of ``STATUSES``; ``error`` is what run() raised (or why it was
    stopped), ``result`` what it returned; ``duration`` the seconds run() took;
    ``settle_started_ns`` / ``settle_ended_ns`` bound the write that recorded it
    (``time.time_ns()``; equal when nothing was written).
    """

    status: str
    duration: float
    error: BaseException | str | None = None
    result: Any = None
    settle_started_ns: int = 0
    settle_ended_ns: int = 0


class Middleware:
    """A base class with every hook a no-op: subclass it and override the ones you need.

    Any object with some of these methods works too; each may be ``async def``.
    """

    def before_run(self, task: Task) -> Any:
        """Called in the worker just before ``run()``; the run's context (contextvars) sees what it sets."""

    def on_exception(self, task: Task, error: BaseException) -> Any:
        """Called when ``run()`` raised, before the failure is recorded."""

    def after_run(self, task: Task, outcome: Outcome) -> Any:
        """Called once the outcome is recorded (or could not be)."""

    def before_push(self, task: Task) -> None:
        """Called with the validated task, id set, before it is inserted; it may set fields (sync only)."""

    def after_push(self, task: Task, error: BaseException | None) -> None:
        """Called after the insert, with its error if it failed (sync only)."""


def _name(hook: Any) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__name__


async def _call(middleware: Any, method: str, *args: Any) -> None:
    hook = getattr(middleware, method, None)
    if hook is None:
        return
    try:
        result = hook(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("middleware %s.%s raised; ignored", _name(middleware), method)


class RunHooks:
    """The middleware of one worker, called in order before a run and in reverse after it."""

    def __init__(self, middleware: Sequence[Any] = ()) -> None:
        self.middleware = list(middleware)

    def __bool__(self) -> bool:
        return bool(self.middleware)

    async def before_run(self, task: Task) -> None:
        for middleware in self.middleware:
            await _call(middleware, "before_run", task)

    async def on_exception(self, task: Task, error: BaseException) -> None:
        for middleware in reversed(self.middleware):
            await _call(middleware, "on_exception", task, error)

    async def after_run(self, task: Task, outcome: Outcome) -> None:
        for middleware in reversed(self.middleware):
            await _call(middleware, "after_run", task, outcome)


# ----------------------------------------------------------------- push

_push_middleware: list[Any] = []


def add_push_middleware(middleware: Any) -> None:
    """Call ``middleware.before_push`` / ``after_push`` around every ``push()`` in this process."""
    if middleware not in _push_middleware:
        _push_middleware.append(middleware)


def remove_push_middleware(middleware: Any) -> None:
    if middleware in _push_middleware:
        _push_middleware.remove(middleware)


def before_push(task: Task) -> None:
    for middleware in _push_middleware:
        hook = getattr(middleware, "before_push", None)
        if hook is not None:
            try:
                hook(task)
            except Exception:
                log.exception("middleware %s.before_push raised; ignored", _name(middleware))


def after_push(task: Task, error: BaseException | None) -> None:
    for middleware in reversed(_push_middleware):
        hook = getattr(middleware, "after_push", None)
        if hook is not None:
            try:
                hook(task, error)
            except Exception:
                log.exception("middleware %s.after_push raised; ignored", _name(middleware))


class PushWatch:
    """A context manager around one push's insert: tells the push middleware how it ended.

    A class rather than a generator context manager, since it wraps every push.
    """

    def __init__(self, task: Task) -> None:
        self.task = task

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        if _push_middleware:
            after_push(self.task, error)


def around_push(task: Task) -> PushWatch:
    """Tell the push middleware how the insert of ``task`` ended (every producer, async or sync)."""
    return PushWatch(task)


# ------------------------------------------------------------ lifecycle

# A lifecycle hook takes the worker. It may be a function, an async function, or a
# (async) generator function: the code before its ``yield`` runs at startup and the
# code after it at shutdown, like a FastAPI lifespan.
LifecycleHook = Callable[[Any], Any]


class Lifecycle:
    """Runs a worker's ``on_startup`` hooks in order, and at shutdown its ``on_shutdown`` hooks
    and the rest of the generator hooks, in reverse."""

    def __init__(self, on_startup: Sequence[LifecycleHook] = (), on_shutdown: Sequence[LifecycleHook] = ()) -> None:
        self.on_startup = list(on_startup)
        self.on_shutdown = list(on_shutdown)
        self._open: list[Any] = []  # the (async) generators of setup hooks, between startup and shutdown

    async def start(self, worker: Any) -> None:
        """Run every startup hook; the first that raises stops the start (as ``HookError``), and the
        generator hooks already started are closed."""
        try:
            for hook in self.on_startup:
                result = hook(worker)
                if inspect.isasyncgen(result):
                    await result.__anext__()
                    self._open.append(result)
                elif inspect.isgenerator(result):
                    next(result)
                    self._open.append(result)
                elif inspect.isawaitable(result):
                    await result
        except BaseException as exc:
            while self._open:
                generator = self._open.pop()
                try:
                    if inspect.isasyncgen(generator):
                        await generator.aclose()
                    else:
                        generator.close()
                except Exception:
                    log.exception("closing a setup hook after a failed startup raised")
            if isinstance(exc, Exception) and not isinstance(exc, HookError):
                reason = redact_text(f"{type(exc).__name__}: {exc}")
                raise HookError(f"startup hook {_name(hook)} failed: {reason}") from exc
            raise

    async def stop(self, worker: Any) -> None:
        """Run the shutdown hooks and finish the generator hooks; each failure is logged, the others still run."""
        for hook in reversed(self.on_shutdown):
            try:
                result = hook(worker)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("on_shutdown hook %s raised", _name(hook))
        while self._open:
            generator = self._open.pop()
            try:
                if inspect.isasyncgen(generator):
                    await generator.__anext__()
                else:
                    next(generator)
            except (StopAsyncIteration, StopIteration):
                continue
            except Exception:
                log.exception("the shutdown part of a setup hook raised")
                continue
            log.error("a setup hook yielded more than once; only its first yield is used")
