"""Waking idle consumers: a change stream where the server has one, else polling with backoff.

``Wakeup`` wakes a consumer when something becomes claimable. ``watch_end`` wakes a
``Task.wait`` when its task may have ended; every waiter on one collection shares one
change stream (per event loop and client), so waiters cost no connection of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import bson
from pymongo.errors import ConnectionFailure, PyMongoError

from beanie_tasks import clock
from beanie_tasks.driver import open_change_stream, primary
from beanie_tasks.redact import get_logger
from beanie_tasks.store import CLAIMABLE_CHANGES, ENDING_CHANGES

log = get_logger("beanie_tasks.wakeup")

# Seconds between attempts to reopen a change stream that a lost connection closed.
REOPEN_AFTER = 5.0

# At most this many announced due times are remembered (the earliest); past it, the worker
# claims on its maintenance timer to find the rest.
MAX_DUES = 10_000

# How long close() waits for a cancelled change stream to shut down.
CLOSE_TIMEOUT = 2.0


def _consume_outcome(task: asyncio.Task[None]) -> None:
    """Retrieve a finished watcher's outcome so asyncio does not warn about it."""
    if not task.cancelled():
        task.exception()


def due_announced(change: Mapping[str, Any]) -> datetime | None:
    """The ``run_at`` a claimable change carries (an insert's document, an update that set it), if any."""
    document = change.get("fullDocument") or change.get("updateDescription", {}).get("updatedFields") or {}
    due = document.get("run_at") if isinstance(document, Mapping) else None
    if not isinstance(due, datetime):
        return None
    return clock.as_utc(due)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _latest_first(due: datetime) -> tuple[int, datetime]:
    """A max-heap key: the later the time, the smaller (whole microseconds, so exact)."""
    return -((due - _EPOCH) // timedelta(microseconds=1)), due


class DueTimes:
    """Announced due times still ahead, each once: O(log n) to add one or drop the earliest or latest.

    A min-heap serves the earliest (the next wake-up), a max-heap the latest (dropped when
    the worker remembers too many), and a set says which times are still held: an entry
    the other heap already dropped is skipped when met, and a heap whose dropped entries
    outnumber the held ones is rebuilt from the set (amortised O(1) per change).
    """

    def __init__(self) -> None:
        self._held: set[datetime] = set()
        self._earliest: list[datetime] = []
        self._latest: list[tuple[int, datetime]] = []

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, due: object) -> bool:
        return due in self._held

    def add(self, due: datetime) -> None:
        if due in self._held:
            return
        self._held.add(due)
        heapq.heappush(self._earliest, due)
        heapq.heappush(self._latest, _latest_first(due))

    def earliest(self) -> datetime | None:
        while self._earliest and self._earliest[0] not in self._held:
            heapq.heappop(self._earliest)
        return self._earliest[0] if self._earliest else None

    def latest(self) -> datetime | None:
        while self._latest and self._latest[0][1] not in self._held:
            heapq.heappop(self._latest)
        return self._latest[0][1] if self._latest else None

    def drop_until(self, now: datetime) -> None:
        """Forget every due time at or before ``now``."""
        while (due := self.earliest()) is not None and due <= now:
            heapq.heappop(self._earliest)
            self._held.discard(due)
        self._compact()

    def drop_latest(self) -> None:
        if self.latest() is not None:
            self._held.discard(heapq.heappop(self._latest)[1])
        self._compact()

    def _compact(self) -> None:
        if len(self._earliest) > 2 * len(self._held) + 16:
            self._earliest = list(self._held)
            heapq.heapify(self._earliest)
        if len(self._latest) > 2 * len(self._held) + 16:
            self._latest = [_latest_first(due) for due in self._held]
            heapq.heapify(self._latest)


class Wakeup:
    """Sleeps until something worth a claim attempt happens, or a bounded time passes.

    With a change stream, ``wait`` returns within milliseconds of a push and otherwise
    after ``idle_timeout`` (so delayed tasks and expired leases are still noticed).
    Without one, it polls: the delay doubles from ``min_poll`` to ``max_poll`` while
    idle and drops back to ``min_poll`` whenever a claim succeeds.

    Given ``now`` (the server's clock), a change that makes a task due only later (a
    delayed push, a retry after backoff) does not wake the waiter: ``wait`` returns when
    the earliest such due time arrives instead, so no claim is sent before it can
    succeed. ``expect`` adds a due time learnt elsewhere (a probe after the stream opened).
    ``max_await`` bounds each server-side wait of the stream (fewer idle ``getMore``).
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
        max_await: float | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._collection = primary(collection)
        self._max_await = max_await
        self._now = now
        self.dues = DueTimes()  # the announced due times still ahead
        self.opened = False  # set each time a stream opens: what was announced before it is unknown
        self.overflowed = False  # more due times were announced than MAX_DUES: some are not remembered
        self._pipeline = pipeline if pipeline is not None else CLAIMABLE_CHANGES
        self._min_poll = min(min_poll, max_poll)
        self._max_poll = max_poll
        self._idle_timeout = idle_timeout
        self._use_change_stream = use_change_stream
        self._poll = self._min_poll
        self._event = asyncio.Event()
        self._rearm = asyncio.Event()  # set when an earlier due time is learnt mid-wait
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
            stream = await open_change_stream(self._collection, self._pipeline, max_await=self._max_await)
        except ConnectionFailure as exc:
            log.info("could not open a change stream (%s); polling until it can be reopened", type(exc).__name__)
            self._schedule_reopen()
            return
        self._reopen_at = None  # cleared only once an attempt completes: a cancelled one is tried again
        if stream is None:
            log.debug("no change stream on this server; polling with backoff")
            return
        self._streaming = True
        self.opened = True
        self._watcher = asyncio.create_task(self._watch(stream))

    def _schedule_reopen(self) -> None:
        self._reopen_at = asyncio.get_running_loop().time() + REOPEN_AFTER

    async def _watch(self, stream: Any) -> None:
        try:
            async with stream:
                async for change in stream:
                    due = due_announced(change)
                    if due is not None and self._now is not None and due > self._now():
                        self.expect(due)  # claimable only later: wake then, not now
                    else:
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

    def expect(self, due: datetime) -> None:
        """A task becomes due at ``due``: ``wait`` returns by then (each due time once, O(log n)).

        A time at or past ``clock.FAR_FUTURE`` is how a task waiting for its links or a
        concurrency slot is parked, not a due time: it is ignored.
        """
        if due >= clock.FAR_FUTURE or due in self.dues:
            return
        if len(self.dues) >= MAX_DUES:
            # Too many to remember: keep the earliest; the worker's periodic claim finds the rest.
            self.overflowed = True
            latest = self.dues.latest()
            if latest is not None and due >= latest:
                return
            self.dues.drop_latest()
        earliest = self.dues.earliest()
        self.dues.add(due)
        if earliest is None or due < earliest:
            self._rearm.set()  # a wait in progress works out its timeout again

    def nothing_delayed(self) -> None:
        """The database holds no delayed task of this stream's queues: no due time is left unremembered."""
        self.overflowed = False

    @property
    def expecting(self) -> bool:
        """Whether announced due times are still ahead (or some could not be remembered)."""
        return bool(self.dues) or self.overflowed

    def claimed(self) -> None:
        """A claim succeeded: poll eagerly again."""
        self._poll = self._min_poll

    async def wait(self) -> bool:
        """Wait for a change, a due time or the timeout; False when only the timeout passed."""
        loop = asyncio.get_running_loop()
        if self._reopen_at is not None and loop.time() >= self._reopen_at:
            # The stream died with the connection (a server restart, say): try again.
            self._watcher = None
            await self.start()
        if not self._streaming:
            timeout, self._poll = self._poll, min(self._poll * 2, self._max_poll)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout)
            self._event.clear()
            return True  # a poll is always worth a claim
        deadline = loop.time() + self._idle_timeout
        while True:
            timeout = deadline - loop.time()
            earliest = self.dues.earliest()
            if earliest is not None and self._now is not None:
                now = self._now()
                if earliest <= now:
                    self.dues.drop_until(now)
                    if self.overflowed and not self.dues:
                        # Every remembered time is spent and some were never remembered: the
                        # next is read from the database, as after a stream opens.
                        self.opened = True
                    return True  # a task announced earlier is due now
                timeout = min(timeout, (earliest - now).total_seconds())
            if timeout <= 0:
                return False
            self._rearm.clear()
            changed = asyncio.ensure_future(self._event.wait())
            rearmed = asyncio.ensure_future(self._rearm.wait())
            try:
                await asyncio.wait({changed, rearmed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
                rearmed.cancel()
                await asyncio.gather(changed, rearmed, return_exceptions=True)
            if self._event.is_set():
                self._event.clear()
                return True
            # A new, earlier due time (or only the timeout): work out the wait again.

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


# ------------------------------------------------------------------ waiting for a task's end

# Seconds a collection's shared stream stays open after its last waiter leaves, for the next one.
LINGER = 5.0
# At most this long a new waiter waits for the stream to open before its first read.
OPEN_WAIT = 5.0
# A waiter the stream covers still re-reads its task about this often (give or take a
# fifth, so waiters spread out), in case the stream hangs without an error.
RECHECK = 60.0
# The first poll of a waiter without a stream; it doubles up to the waiter's ``max_poll``.
MIN_POLL = 0.05


class EndStream:
    """The change stream of one collection, shared by every waiter on it in one event loop.

    It opens when the first waiter arrives, dispatches each ending change to the waiters
    on that task id, and closes ``LINGER`` seconds after the last waiter leaves. Each time
    a stream is established the epoch moves on: a waiter that read its task while the
    current epoch was streaming is covered (no end after that read can be missed); any
    other waiter polls. When the stream breaks every waiter is woken to read again, and
    the stream is reopened every ``REOPEN_AFTER`` seconds while waiters remain.
    """

    def __init__(self, collection: Any, key: tuple[Any, ...], loop: asyncio.AbstractEventLoop) -> None:
        self._collection = collection
        self._key = key
        self.loop = loop
        self._name = f"{getattr(collection.database, 'name', '?')}.{collection.name}"
        self._waiters: dict[Any, set[EndWaiter]] = {}
        self._count = 0
        self._epoch = 0
        self._streaming = False
        self._settled = asyncio.Event()  # the first attempt to open has completed, either way
        self._task: asyncio.Task[None] | None = None
        self._closer: asyncio.TimerHandle | None = None
        self.closed = False

    def add(self, waiter: EndWaiter) -> None:
        if self._closer is not None:
            self._closer.cancel()
            self._closer = None
        self._waiters.setdefault(waiter.key, set()).add(waiter)
        self._count += 1
        if self._task is None:
            self._task = self.loop.create_task(self._run())

    def remove(self, waiter: EndWaiter) -> None:
        same = self._waiters.get(waiter.key)
        if same is None or waiter not in same:
            return
        same.discard(waiter)
        if not same:
            del self._waiters[waiter.key]
        self._count -= 1
        if self._count == 0 and not self.closed:
            self._closer = self.loop.call_later(LINGER, self._close)

    async def opened(self, timeout: float | None) -> None:
        """Wait (a bounded time) for the first attempt to open the stream to complete."""
        bound = OPEN_WAIT if timeout is None else min(timeout, OPEN_WAIT)
        if self._settled.is_set() or bound <= 0:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._settled.wait(), bound)

    def epoch(self) -> int | None:
        """The current epoch while the stream is delivering, else None."""
        return self._epoch if self._streaming else None

    def covers(self, epoch: int | None) -> bool:
        return epoch is not None and self._streaming and epoch == self._epoch

    def _close(self) -> None:
        self._closer = None
        self.closed = True
        if _streams.get(self._key) is self:
            del _streams[self._key]
        task, self._task = self._task, None
        if task is not None:
            # Cancelling closes the cursor (``killCursors``) on the task's way out.
            task.cancel()
            task.add_done_callback(_consume_outcome)

    def _dispatch(self, change: Mapping[str, Any]) -> None:
        key = change.get("documentKey")
        if not isinstance(key, Mapping) or "_id" not in key:
            self._wake_all()  # a drop or a rename: every waiter reads again
            return
        for waiter in self._waiters.get(_id_key(key["_id"]), ()):
            waiter.wake()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.wake()

    async def _run(self) -> None:
        while True:
            if not await self._follow():
                return  # no change streams here: every waiter polls
            await asyncio.sleep(REOPEN_AFTER)

    async def _follow(self) -> bool:
        """Follow one stream until it ends; False when this server has no change streams."""
        try:
            stream = await open_change_stream(self._collection, ENDING_CHANGES)
            if stream is None:
                log.debug("no change stream on this server; waiters on %s poll with backoff", self._name)
                return False
            async with stream:  # Motor opens its cursor here, PyMongo already has
                self._epoch += 1
                self._streaming = True
                self._settled.set()
                async for change in stream:
                    self._dispatch(change)
            log.info("change stream on %s ended; waiters poll until it can be reopened", self._name)
        except asyncio.CancelledError:
            raise
        except PyMongoError as exc:
            reason = type(exc).__name__
            log.info("change stream on %s closed (%s); waiters poll until it can be reopened", self._name, reason)
        except Exception:
            log.warning("change stream on %s failed; waiters poll until it can be reopened", self._name, exc_info=True)
        finally:
            self._settled.set()
            if self._streaming:
                self._streaming = False
                self._wake_all()
        return True


class EndWaiter:
    """One ``Task.wait`` call: woken when its task may have ended, or when it is time to poll."""

    def __init__(self, stream: EndStream, task_id: Any, *, max_poll: float) -> None:
        self.key = _id_key(task_id)
        self._stream = stream
        self._event = asyncio.Event()
        self._max_poll = max_poll
        self._poll = min(MIN_POLL, max_poll)
        self._epoch: int | None = None

    def wake(self) -> None:
        self._event.set()

    def reading(self) -> None:
        """Called just before each read: the stream covers the read when it is streaming now."""
        self._epoch = self._stream.epoch()

    async def wait(self, timeout: float | None) -> None:
        """Return when the task may have ended, when a poll is due, or after ``timeout`` seconds."""
        if self._stream.covers(self._epoch):
            delay = RECHECK * random.uniform(0.8, 1.2)
        else:
            delay = self._poll
            self._poll = min(self._poll * 2, self._max_poll)
        if timeout is not None:
            delay = min(delay, max(timeout, 0.0))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), delay)
        self._event.clear()
        self.reading()


def _id_key(task_id: Any) -> Any:
    """A task id as a dictionary key: itself, or its BSON encoding when unhashable (a document id)."""
    try:
        hash(task_id)
    except TypeError:
        return bson.encode({"_id": task_id})
    return task_id


_streams: dict[tuple[Any, ...], EndStream] = {}


def _stream_for(collection: Any) -> EndStream:
    """The shared stream of ``collection`` in the running loop (one per loop, client and namespace)."""
    loop = asyncio.get_running_loop()
    database = collection.database
    client = getattr(database, "client", None)
    key = (id(loop), id(client), getattr(database, "name", None), collection.name)
    found = _streams.get(key)
    if found is not None and found.loop is loop and not found.closed:
        return found
    for stale in [k for k, s in _streams.items() if s.loop.is_closed()]:
        del _streams[stale]  # left behind by a loop that closed while its stream lingered
    created = _streams[key] = EndStream(primary(collection), key, loop)
    return created


@contextlib.asynccontextmanager
async def watch_end(
    collection: Any, task_id: Any, *, max_poll: float, timeout: float | None
) -> AsyncIterator[EndWaiter]:
    """Subscribe to the end of one task, then let the caller read it (so no end is missed).

    ``timeout`` bounds how long this waits for a new stream to open before the first
    read; a waiter that reads before its stream streams polls until a later read is covered.
    """
    stream = _stream_for(collection)
    waiter = EndWaiter(stream, task_id, max_poll=max_poll)
    stream.add(waiter)
    try:
        await stream.opened(timeout)
        waiter.reading()
        yield waiter
    finally:
        stream.remove(waiter)
