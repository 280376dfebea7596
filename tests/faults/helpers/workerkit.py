"""An in-process Worker run in the background, and waits that fail at once if the worker dies."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from beanie_tasks.worker import Worker


@contextlib.asynccontextmanager
async def background(worker: Worker, *, stop_timeout: float = 20.0) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``worker`` for the block; on leaving, stop it and wait for its drain.

    A worker that raised is reported when the block ends normally (``Worker.run`` must not raise).
    """
    stop = asyncio.Event()
    job = asyncio.create_task(worker.run(stop))
    failed = True
    try:
        yield job
        failed = False
    finally:
        stop.set()
        done, _pending = await asyncio.wait({job}, timeout=stop_timeout)
        if not done:
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
            if not failed:
                raise AssertionError(f"the worker did not stop within {stop_timeout:g} s")
        elif not failed and not job.cancelled() and job.exception() is not None:
            raise AssertionError(f"Worker.run raised {job.exception()!r}") from job.exception()


async def until(
    probe: Callable[[], Awaitable[Any]],
    *,
    timeout: float,
    what: str,
    job: asyncio.Task[None] | None = None,
    every: float = 0.1,
) -> Any:
    """Poll ``probe`` until it returns a truthy non-string; a string is the progress shown on timeout.

    With ``job`` (a running ``Worker.run``), fail at once if the worker ended, with what it raised.
    """
    deadline = time.monotonic() + timeout
    while True:
        if job is not None and job.done():
            error = None if job.cancelled() else job.exception()
            raise AssertionError(f"the worker stopped while waiting for {what}: Worker.run raised {error!r}")
        value = await probe()
        if value and not isinstance(value, str):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {value!r})")
        await asyncio.sleep(every)


def long_ago() -> datetime:
    """A moment well in the past on any clock (an expired lease, a due run_at)."""
    return datetime.now(timezone.utc) - timedelta(hours=1)
