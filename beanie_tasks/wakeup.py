"""Waking idle consumers: a change stream where the server has one, else polling with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from pymongo.errors import ConnectionFailure, PyMongoError

from beanie_tasks.driver import open_change_stream, primary

log = logging.getLogger("beanie_tasks.wakeup")

# Seconds between attempts to reopen a change stream that a lost connection closed.
REOPEN_AFTER = 5.0

# Inserts, and updates that make a task claimable again (retry, release, unblocking).
CLAIMABLE_CHANGES: list[dict[str, Any]] = [
    {
        "$match": {
            "$or": [
                {"operationType": "insert"},
                {"updateDescription.updatedFields.state": "CREATED"},
                {"updateDescription.updatedFields.run_at": {"$exists": True}},
            ]
        }
    }
]


# How long close() waits for a cancelled change stream to shut down.
CLOSE_TIMEOUT = 2.0


def _consume_outcome(task: asyncio.Task[None]) -> None:
    """Retrieve a finished watcher's outcome so asyncio does not warn about it."""
    if not task.cancelled():
        task.exception()


class Wakeup:
    """Sleeps until something worth a claim attempt happens, or a bounded time passes.

    With a change stream, ``wait`` returns within milliseconds of a push and otherwise
    after ``idle_timeout`` (so delayed tasks and expired leases are still noticed).
    Without one, it polls: the delay doubles from ``min_poll`` to ``max_poll`` while
    idle and drops back to ``min_poll`` whenever a claim succeeds.
    """

    def __init__(
        self,
        collection: Any,
        *,
        pipeline: list[dict[str, Any]] | None = None,
        min_poll: float = 0.05,
        max_poll: float = 0.5,
        idle_timeout: float = 1.0,
        use_change_stream: bool = True,
    ) -> None:
        self._collection = primary(collection)
        self._pipeline = pipeline if pipeline is not None else CLAIMABLE_CHANGES
        self._min_poll = min(min_poll, max_poll)
        self._max_poll = max_poll
        self._idle_timeout = idle_timeout
        self._use_change_stream = use_change_stream
        self._poll = self._min_poll
        self._event = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._streaming = False
        self._reopen_at: float | None = None

    @property
    def streaming(self) -> bool:
        """True while a change stream is delivering events."""
        return self._streaming

    async def start(self) -> None:
        if not self._use_change_stream or self._watcher is not None:
            return
        try:
            stream = await open_change_stream(self._collection, self._pipeline)
        except ConnectionFailure as exc:
            log.info("could not open a change stream (%s); polling until it can be reopened", type(exc).__name__)
            self._schedule_reopen()
            return
        self._reopen_at = None  # cleared only once an attempt completes: a cancelled one is tried again
        if stream is None:
            log.debug("no change stream on this server; polling with backoff")
            return
        self._streaming = True
        self._watcher = asyncio.create_task(self._watch(stream))

    def _schedule_reopen(self) -> None:
        self._reopen_at = asyncio.get_running_loop().time() + REOPEN_AFTER

    async def _watch(self, stream: Any) -> None:
        try:
            async with stream:
                async for _change in stream:
                    self._event.set()
        except asyncio.CancelledError:
            raise
        except PyMongoError as exc:
            log.info("change stream closed (%s); polling until it can be reopened", type(exc).__name__)
            self._schedule_reopen()
        finally:
            self._streaming = False

    def notify(self) -> None:
        """Wake the waiter now (used by the process that pushed, and by stop signals)."""
        self._event.set()

    def claimed(self) -> None:
        """A claim succeeded: poll eagerly again."""
        self._poll = self._min_poll

    async def wait(self) -> None:
        if self._reopen_at is not None and asyncio.get_running_loop().time() >= self._reopen_at:
            # The stream died with the connection (a server restart, say): try again.
            self._watcher = None
            await self.start()
        timeout = self._idle_timeout if self._streaming else self._poll
        if not self._streaming:
            self._poll = min(self._poll * 2, self._max_poll)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        self._event.clear()

    async def close(self) -> None:
        """Stop watching, waiting a bounded time for the cursor to close.

        Closing a change stream sends ``killCursors``; with a cancelled ``getMore`` still
        holding the connection under load that can take long, and a consumer must never
        hang on its way out, so the watcher is left to finish on its own past the bound.
        """
        watcher, self._watcher = self._watcher, None
        self._streaming = False
        if watcher is None:
            return
        watcher.cancel()
        done, _ = await asyncio.wait({watcher}, timeout=CLOSE_TIMEOUT)
        if not done:
            log.debug("change stream still closing after %.0fs; not waiting for it", CLOSE_TIMEOUT)
        watcher.add_done_callback(_consume_outcome)

    async def __aenter__(self) -> Wakeup:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
