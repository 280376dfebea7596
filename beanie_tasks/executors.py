"""Running a plain ``def run()``: in a worker thread, or in a child process the worker can kill.

A thread cannot be interrupted. So the worker never treats a thread's task as stopped
before the thread has returned: its slot stays busy and its lease is kept alive until
then, and two executions of one task can never overlap. A class whose sync handler must
be stoppable (a timeout, a cancel, a shutdown) declares ``TaskSettings.executor =
"process"``: each run then happens in a fresh child process, which is killed when the
run must stop, as Celery's prefork pool and RQ's forking worker do. The child rebuilds
the task from its fields, so the class must be importable by its module and name.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import importlib
import multiprocessing
import pickle
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

# How long a killed child gets to be reaped before the run is given up on.
KILL_WAIT = 5.0

# The event loop of the worker whose thread runs the current sync run(), so the handler can
# reach the database through it (``Task.set_progress_sync``); None anywhere else.
worker_loop: contextvars.ContextVar[asyncio.AbstractEventLoop | None] = contextvars.ContextVar(
    "beanie_tasks_worker_loop", default=None
)


class ThreadRun:
    """One sync ``run()`` in the worker's thread pool, and when its thread really started and ended."""

    def __init__(self, pool: concurrent.futures.Executor, handler: Callable[[], Any]) -> None:
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[None] = loop.create_future()

        def call() -> Any:
            worker_loop.set(loop)
            loop.call_soon_threadsafe(_resolve, self.started)
            return handler()

        # The thread sees the worker's context (a tracing span set by middleware), as asyncio.to_thread does.
        self.future = pool.submit(contextvars.copy_context().run, call)

    async def result(self) -> Any:
        """The handler's return value; cancelling this wait leaves the thread running."""
        return await asyncio.wrap_future(self.future)

    def done(self) -> bool:
        return self.future.done()

    async def ended(self) -> None:
        """Wait until the thread has returned, however the waiting for it was cancelled before."""
        if not self.future.done():
            with contextlib.suppress(BaseException):
                await asyncio.wrap_future(self.future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class ProcessRun:
    """One sync ``run()`` in a child process; cancelling ``result()`` kills the child."""

    def __init__(self, task: Any) -> None:
        task_class = type(task)
        self._payload = (task_class.__module__, task_class.__qualname__, task.model_dump())
        self._process: Any = None
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def result(self) -> Any:
        context = multiprocessing.get_context("spawn")
        receiver, sender = context.Pipe(duplex=False)
        self._process = context.Process(target=child_main, args=(*self._payload, sender), daemon=True)
        self._process.start()
        sender.close()
        _resolve(self.started)
        try:
            outcome = await asyncio.to_thread(_receive, receiver)
        except asyncio.CancelledError:
            self.kill()
            raise
        finally:
            receiver.close()
        await asyncio.to_thread(self._process.join, KILL_WAIT)
        kind, value = outcome
        if kind == "ok":
            return value
        raise value

    def kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(KILL_WAIT)

    def done(self) -> bool:
        return self._process is not None and not self._process.is_alive()

    async def ended(self) -> None:
        if self._process is not None and self._process.is_alive():
            await asyncio.to_thread(self._process.join)


class ChildDied(RuntimeError):
    """The child process running ``run()`` ended without an outcome (killed, crashed, out of memory)."""


def _receive(receiver: Connection) -> tuple[str, Any]:
    try:
        kind, blob = receiver.recv()
    except EOFError:
        return "error", ChildDied("the child process running run() ended without an outcome (killed or crashed)")
    return kind, pickle.loads(blob)


def child_main(module: str, qualname: str, fields: dict[str, Any], sender: Connection) -> None:
    """In the child: rebuild the task from its fields, run it, send back the outcome."""
    try:
        task_class: Any = importlib.import_module(module)
        for part in qualname.split("."):
            task_class = getattr(task_class, part)
        task = task_class.model_construct(**fields)
        outcome: tuple[str, Any] = ("ok", task.run())
    except BaseException as exc:  # everything the handler raised goes back to the worker
        outcome = ("error", exc)
    try:
        blob = pickle.dumps(outcome[1])
    except Exception:
        if outcome[0] == "ok":
            blob = pickle.dumps(TypeError(f"run() returned a {type(outcome[1]).__name__}, which cannot be pickled"))
            outcome = ("error", None)
        else:
            error = outcome[1]
            text = "".join(traceback.format_exception_only(type(error), error)).strip()
            blob = pickle.dumps(RuntimeError(text))
    sender.send((outcome[0], blob))
    sender.close()
