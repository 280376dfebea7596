"""The worker: runs the ``run()`` of registered task classes, N at a time, in one asyncio process.

It claims fairly across classes (round-robin), keeps each lease alive with heartbeats
while ``run`` works, enforces ``timeout``, stops a task cancelled by someone else within
one heartbeat, retries recording an outcome that a dropped connection lost, honours
rate and concurrency limits, recovers expired leases, and on
SIGTERM/SIGINT drains gracefully: running tasks get ``grace_period`` seconds, and those
still running are released unspent so another worker picks them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

from pymongo.errors import ConnectionFailure, PyMongoError

from beanie_tasks import clock, dependencies, maintenance, store
from beanie_tasks.acks import ACK_WINDOW, FinishBatcher
from beanie_tasks.discovery import import_modules, task_classes_in
from beanie_tasks.errors import LeaseLost, TaskCancelled, TransitionError
from beanie_tasks.executors import ProcessRun, ThreadRun
from beanie_tasks.hooks import (
    CANCELLED,
    FAILED,
    FINISHED,
    LEASE_LOST,
    NOT_RECORDED,
    RELEASED,
    RETRYING,
    Lifecycle,
    LifecycleHook,
    Outcome,
    RunHooks,
)
from beanie_tasks.limits import LimitPolicy
from beanie_tasks.redact import get_logger, redact_text
from beanie_tasks.states import State
from beanie_tasks.store import MAX_BATCH
from beanie_tasks.task import (
    SWEEP_EVERY_RECOVERIES,
    Outage,
    Task,
    claim,
    default_consumer_id,
    describe_error,
    explain_error,
)
from beanie_tasks.wakeup import Wakeup

log = get_logger("beanie_tasks.worker")

# On a quiet queue the worker skips the claim of a maintenance round, but not of every
# this-many-th round (a safety net for whatever a change stream might miss). That claim
# tries one queue, the next in turn each time, so an idle worker's cost stays the same
# however many classes it runs.
CLAIM_EVERY_QUIET_ROUNDS = 6
# The longest an idle wake-up stream's getMore waits on the server for a change.
STREAM_MAX_AWAIT = 5.0
# How long a drained task gets, after its run() was cancelled, to be released.
RELEASE_TIMEOUT = 10.0
# After stop, how long background jobs (schedules) get to end on their own.
BACKGROUND_STOP_TIMEOUT = 5.0
# A settle (finish/fail/release) that hits a dropped connection is retried, after these
# pauses, before the task is left to lease recovery. Repeating a settle is safe: one
# whose first attempt was applied after all returns success, not LeaseLost.
SETTLE_RETRY_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0)


@dataclasses.dataclass
class _Running:
    """One task this worker is executing, and why its run() was stopped early (if it was)."""

    task: Task
    runner: asyncio.Future[Any] | None = None
    handle: ThreadRun | ProcessRun | None = None  # a sync run(): its thread or child process
    stopped_because: str | None = None  # "cancelled", "lease lost", "timeout", "shutdown"
    duration: float = 0.0  # seconds run() took
    attempts_at_claim: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.attempts_at_claim = self.task.attempts

    def handler_ended(self) -> bool:
        """Whether run() is over: its coroutine done, and a sync handler's thread returned too."""
        runner_done = self.runner is not None and self.runner.done()
        return runner_done and (self.handle is None or self.handle.done())

    def thread_running(self) -> bool:
        return isinstance(self.handle, ThreadRun) and not self.handle.done()


def _status_of(task: Task, *, failed: bool) -> str:
    """The outcome status a settled task's state means; back in CREATED, ``failed`` tells a retry from a release."""
    return {
        State.FINISHED: FINISHED,
        State.FAILED: FAILED,
        State.CANCELLED: CANCELLED,
        State.CREATED: RETRYING if failed else RELEASED,
    }.get(task.state, NOT_RECORDED)


def _fields(record: _Running) -> dict[str, Any]:
    """The ``extra`` of a task's log line: JSON logs show each as its own key."""
    task = record.task
    return {
        "task_class": type(task).__name__,
        "task_id": str(task.id),
        "attempt": task.attempts,
        "duration": round(record.duration, 6),
        "outcome": task.state.value,
    }


def _has_own_run(task_class: type[Task]) -> bool:
    return any("run" in vars(klass) for klass in task_class.__mro__ if klass is not Task and issubclass(klass, Task))


def _expand_modules(entries: Sequence[type[Task] | ModuleType | str]) -> list[Any]:
    """Task classes as given, and for a module (or its dotted name) the classes in it that define run()."""
    classes: list[Any] = []
    for entry in entries:
        if isinstance(entry, (str, ModuleType)):
            module = import_modules([entry])[0] if isinstance(entry, str) else entry
            found = [cls for cls in task_classes_in([module]) if _has_own_run(cls)]
            if not found:
                raise ValueError(f"module {module.__name__!r} defines no Task subclass with a run() method")
            classes.extend(found)
        else:
            classes.append(entry)
    return classes


class Worker:
    """Runs tasks of ``task_classes`` (classes, or modules / dotted module names holding them) until stopped.

    ``concurrency`` bounds how many ``run()`` calls are in progress at once in this process
    (a class's ``TaskSettings.concurrency`` can cap its own share further). Several
    workers, on one machine or many, can share a database. ``middleware``, ``on_startup``
    and ``on_shutdown`` are hooks (``beanie_tasks.hooks``): around each run, and before the
    first claim / after the drain.
    """

    def __init__(
        self,
        task_classes: Sequence[type[Task] | ModuleType | str],
        *,
        concurrency: int = 10,
        consumer_id: str | None = None,
        grace_period: float = 30.0,
        use_change_stream: bool = True,
        schedules: bool = True,
        partitions: Sequence[Any] | None = None,
        ack_window: float = ACK_WINDOW,
        middleware: Sequence[Any] = (),
        on_startup: Sequence[LifecycleHook] = (),
        on_shutdown: Sequence[LifecycleHook] = (),
    ) -> None:
        classes = list(dict.fromkeys(_expand_modules(task_classes)))
        if not classes:
            raise ValueError("a Worker needs at least one task class")
        for task_class in classes:
            if not (isinstance(task_class, type) and issubclass(task_class, Task)):
                raise TypeError(f"a Worker runs Task subclasses, got {task_class!r}")
            if not _has_own_run(task_class):
                raise TypeError(f"{task_class.__name__} has no run() method: define `async def run(self)` on it")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be a whole number >= 1, got {concurrency!r}")
        if grace_period < 0:
            raise ValueError(f"grace_period must be >= 0 seconds, got {grace_period!r}")
        self.task_classes = classes
        self.concurrency = concurrency
        self.consumer_id = consumer_id or default_consumer_id()
        self.grace_period = float(grace_period)
        self.use_change_stream = use_change_stream
        self.schedules = schedules
        if partitions is not None and not list(partitions):
            raise ValueError("partitions, when given, must name at least one partition")
        self.partitions: list[Any] | None = list(partitions) if partitions is not None else None
        for task_class in classes:
            if self.partitions is not None and task_class.task_options.partition_by is None:
                raise ValueError(
                    f"{task_class.__name__} has no TaskSettings.partition_by, so it cannot be pinned to partitions"
                )
        if ack_window < 0:
            raise ValueError(f"ack_window must be >= 0 seconds (0 finishes each task on its own), got {ack_window!r}")
        self.stats: Counter[str] = Counter()
        # Finishes that end within ``ack_window`` of each other share one bulk write.
        self.acks = FinishBatcher(ack_window)
        # What the claim loop goes round: every class, once per partition this worker is pinned to.
        self._queues: list[tuple[type[Task], Any]] = [
            (task_class, partition) for task_class in classes for partition in (self.partitions or [None])
        ]
        self._running: dict[asyncio.Task[None], _Running] = {}
        self._next_class = 0
        self._wakeup_of: dict[str, Wakeup] = {}  # database name -> its wake-up stream
        # Whether the last claim round passed over a class for lack of room (its cap was reached).
        self._room_was_short = False
        # Classes with caps or limits: a task of theirs ending can free room for another at once.
        self._limited = any(
            c.task_options.concurrency is not None or LimitPolicy.of(c.task_options).active for c in classes
        )
        # Queues whose last claim got all it asked for: a backlog, so the next claim asks for every free slot.
        self._backlogged: set[int] = set()
        self._stop_requested = False
        self._stopping: asyncio.Event | None = None
        self._slot_freed: asyncio.Event | None = None
        self._signals_received = 0
        self._signals_wanted = False
        self._executor: ThreadPoolExecutor | None = None
        # Hooks (hooks.py): middleware around each run, and startup/shutdown hooks; none by default.
        self.hooks = RunHooks(middleware)
        self.lifecycle = Lifecycle(on_startup, on_shutdown)
        # Health, for /healthz: when the claim loop last went round (time.monotonic()), and
        # whether the worker is started, reaching the server and not stopping.
        self.last_tick: float | None = None
        self.ready = False

    # ----------------------------------------------------------- control

    def stop(self) -> None:
        """Stop claiming and drain (the same as a first SIGTERM)."""
        self._stop_requested = True
        if self._stopping is not None:
            self._stopping.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: the first drains gracefully, a second exits the process at once.

        Call it before ``run()`` (handlers are installed on the loop ``run()`` uses) or
        from inside the running loop.
        """
        self._signals_wanted = True
        with contextlib.suppress(RuntimeError):
            self._install_signals(asyncio.get_running_loop())

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        self._signals_received += 1
        name = signal.Signals(signum).name
        if self._signals_received == 1:
            log.warning(
                "%s: stopping claims; %d running task(s) get up to %.0f s to finish, then are released "
                "(send %s again to exit at once)",
                name,
                len(self._running),
                self.grace_period,
                name,
            )
            self.stop()
            return
        log.error(
            "%s again: exiting now; %d running task(s) keep their leases until they expire, then are recovered",
            name,
            len(self._running),
        )
        for handler in logging.getLogger().handlers + log.handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        sys.stderr.flush()
        os._exit(128 + signum)

    @property
    def running(self) -> int:
        """How many tasks this worker is executing now."""
        return len(self._running)

    @contextlib.asynccontextmanager
    async def in_background(self) -> AsyncIterator[Worker]:
        """Run the worker alongside the block (an app's lifespan, a test), and drain it when the block ends.

        Leaving the block is a graceful stop, as SIGTERM is: running tasks get
        ``grace_period`` seconds, then the rest are released. An error that stopped the
        worker early is logged at once and raised when the block ends.
        """
        job = asyncio.create_task(self.run())
        job.add_done_callback(self._report_early_end)
        try:
            yield self
        finally:
            self.stop()
            await job

    def _report_early_end(self, job: asyncio.Task[None]) -> None:
        if not self._stop_requested and not job.cancelled() and job.exception() is not None:
            log.error("worker %s stopped with an error", self.consumer_id, exc_info=job.exception())

    async def run_claimed(self, task: Task) -> None:
        """Run one task this worker's consumer has already claimed, exactly as the claim loop does.

        Heartbeats, progress, the timeout, cancellation and the recorded outcome (finish, or
        fail with the retry policy) all go through the worker's own path; ``task`` is left
        holding the outcome. Used by ``beanie_tasks.testing.run_now``, on a worker whose
        ``run()`` is not in progress (its sync handlers get a thread of their own here).
        """
        previous, self._executor = self._executor, ThreadPoolExecutor(1, thread_name_prefix="beanie-tasks")
        self.stats["started"] += 1
        try:
            await self._execute(_Running(task))
        finally:
            # A sync run() has returned by now: _execute waits for its thread.
            self._executor.shutdown(wait=False)
            self._executor = previous

    @property
    def database(self) -> Any:
        """The database of the worker's (first) task class: for a startup hook's ``init_beanie`` of other models."""
        return self.task_classes[0].collection().database

    # ------------------------------------------------------------- main

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Claim and run tasks until ``stop`` is set, ``stop()`` is called or a signal arrives; then drain."""
        loop = asyncio.get_running_loop()
        await self.lifecycle.start(self)  # the app's setup (its other models, its clients) comes first
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        if self._stop_requested:
            self._stopping.set()
        if self._signals_wanted:
            self._install_signals(loop)
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="beanie-tasks")
        for task_class in self.task_classes:
            task_class.task_store()  # NotRegistered, at once, for a class init_beanie never saw
        background: list[asyncio.Task[Any]] = []
        if stop is not None:
            background.append(asyncio.create_task(self._follow(stop)))
        wakeups = self._wakeups()
        try:
            for wakeup in wakeups:
                await wakeup.start()
            background.extend(self._start_schedules())
            background.append(asyncio.create_task(self._keep_registered()))
            log.info(
                "worker %s running %s with concurrency %d",
                self.consumer_id,
                ", ".join(c.__name__ for c in self.task_classes),
                self.concurrency,
            )
            await self._claim_loop(wakeups)
        finally:
            self.ready = False
            await self._drain()
            await self.acks.close()
            for wakeup in wakeups:
                await wakeup.close()
            await self._stop_background(background)
            await self.lifecycle.stop(self)
            self._executor.shutdown(wait=False, cancel_futures=True)
            if self._signals_wanted:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(signum)
            log.info("worker %s stopped (%s)", self.consumer_id, dict(self.stats) or "nothing ran")

    async def _follow(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.stop()

    async def _keep_registered(self) -> None:
        """Keep this worker's registry document fresh, once per heartbeat interval, until the worker stops.

        The dashboard lists workers from it; a worker that dies stops refreshing and its
        document expires (TTL) a few intervals later. A stopping worker removes its own.
        """
        assert self._stopping is not None
        every = min(c.task_options.heartbeat_every for c in self.task_classes)
        database = self.task_classes[0].collection().database
        fields = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "concurrency": self.concurrency,
            "classes": [c.__name__ for c in self.task_classes],
            "started_at": clock.now(self.task_classes[0].collection()),
        }
        with contextlib.suppress(PyMongoError):
            await store.ensure_worker_index(database)
        while not self._stopping.is_set():
            try:
                await store.record_worker(database, self.consumer_id, fields, keep_for=every * 3)
            except PyMongoError as exc:
                log.warning("worker %s: could not refresh its registry entry: %s", self.consumer_id, exc)
            await self._until(self._stopping, every)
        with contextlib.suppress(PyMongoError):
            await store.forget_worker(database, self.consumer_id)

    def _wakeups(self) -> list[Wakeup]:
        """One wake-up stream per database, for every task collection in it (one ``getMore`` per
        ``STREAM_MAX_AWAIT`` when idle, however many classes the worker runs)."""
        by_database: dict[str, tuple[Any, list[str]]] = {}
        for task_class in self.task_classes:
            collection = task_class.collection()
            database, names = by_database.setdefault(collection.database.name, (collection.database, []))
            if collection.name not in names:
                names.append(collection.name)
        poll = min(c.task_options.poll_interval for c in self.task_classes)
        recovery = min(c.task_options.recovery_interval for c in self.task_classes)
        now = self.task_classes[0].task_store().now
        self._wakeup_of = {}
        wakeups = []
        for name, (database, collections) in by_database.items():
            wakeup = Wakeup(
                database,
                pipeline=store.claimable_changes(collections),
                max_poll=poll,
                idle_timeout=recovery,
                use_change_stream=self.use_change_stream,
                max_await=min(STREAM_MAX_AWAIT, recovery),
                now=now,
            )
            self._wakeup_of[name] = wakeup
            wakeups.append(wakeup)
        return wakeups

    async def _learn_due_times(self, wakeups: list[Wakeup]) -> None:
        """After a stream opened, read when each queue's earliest delayed task falls due (the
        stream announces later ones): one ``find`` per queue, only then. A stream whose
        announced times overflowed what it remembers reads again each time they are spent."""
        opened = [w for w in wakeups if w.opened]
        if not opened:
            return
        for wakeup in opened:
            wakeup.opened = False
        delayed: set[Wakeup] = set()
        for task_class, partition in self._queues:
            wakeup = self._wakeup_of[task_class.collection().database.name]
            if wakeup not in opened:
                continue
            task_store = task_class.task_store()
            try:
                due = await task_store.next_due(task_store.now(), partition)
            except PyMongoError as exc:  # without it the maintenance timer still bounds the wait
                log.debug(
                    "worker %s: could not read when %s is next due: %s", self.consumer_id, task_class.__name__, exc
                )
                delayed.add(wakeup)  # unknown: what it may have left unremembered stays so
                continue
            if due is not None:
                wakeup.expect(due)
                delayed.add(wakeup)
        for wakeup in opened:
            if wakeup not in delayed:
                wakeup.nothing_delayed()

    def _start_schedules(self) -> list[asyncio.Task[Any]]:
        """Run ``beanie_tasks.schedule.run_schedules`` alongside, when that module provides it."""
        if not self.schedules or importlib.util.find_spec("beanie_tasks.schedule") is None:
            return []
        run_schedules: Callable[..., Coroutine[Any, Any, None]] | None = getattr(
            importlib.import_module("beanie_tasks.schedule"), "run_schedules", None
        )
        if run_schedules is None:
            return []
        assert self._stopping is not None
        job: asyncio.Task[None] = asyncio.create_task(run_schedules(self.task_classes, self._stopping))
        job.add_done_callback(self._report_background_end)
        return [job]

    @staticmethod
    def _report_background_end(job: asyncio.Task[Any]) -> None:
        if not job.cancelled() and job.exception() is not None:
            log.error("periodic schedules stopped with an error", exc_info=job.exception())

    async def _stop_background(self, jobs: list[asyncio.Task[Any]]) -> None:
        if not jobs:
            return
        _done, pending = await asyncio.wait(jobs, timeout=BACKGROUND_STOP_TIMEOUT)
        for job in pending:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    async def _claim_loop(self, wakeups: list[Wakeup]) -> None:
        assert self._stopping is not None and self._slot_freed is not None
        loop = asyncio.get_running_loop()
        outage = Outage(f"worker {self.consumer_id}")
        next_maintenance = 0.0
        rounds = 0
        quiet = False  # the last wait ended by the timer alone, every stream up: nothing became claimable
        self.ready = True
        while not self._stopping.is_set():
            self.last_tick = time.monotonic()
            try:
                if loop.time() >= next_maintenance:
                    # The timer moves on first: a round that fails must not be retried before every claim.
                    next_maintenance = loop.time() + min(c.task_options.recovery_interval for c in self.task_classes)
                    rounds += 1
                    await self._maintain(sweep=rounds % SWEEP_EVERY_RECOVERIES == 1)
                    if quiet and rounds % CLAIM_EVERY_QUIET_ROUNDS:
                        # A stream would have announced anything claimable (recovery's own writes
                        # included): wait again without a claim that cannot succeed. Every few
                        # rounds the worker claims anyway, whatever a stream may have missed.
                        quiet = not await self._idle(wakeups, until=next_maintenance - loop.time())
                        continue
                safety_net, quiet = quiet, False
                if len(self._running) >= self.concurrency:
                    self._slot_freed.clear()
                    await self._until(self._slot_freed, timeout=next_maintenance - loop.time())
                    continue
                await self._gather_free_slots()
                self._slot_freed.clear()  # a task ending from here on warrants another claim round
                started = await self._claim_next(only_one=safety_net)
            except ConnectionFailure as exc:
                self.ready = False
                await outage.wait(exc, self._stopping)
                continue
            except PyMongoError as exc:
                log.error("worker %s: database error while claiming: %s", self.consumer_id, exc)
                await outage.wait(exc, self._stopping)
                continue
            outage.over()
            self.ready = not self._stopping.is_set()
            if started:
                for wakeup in wakeups:
                    wakeup.claimed()
                continue
            await self._learn_due_times(wakeups)
            woken = await self._idle(wakeups, until=next_maintenance - loop.time())
            quiet = not woken and not self._limited and all(w.streaming and not w.expecting for w in wakeups)

    async def _gather_free_slots(self) -> None:
        """On a backlog, let slots that free within one ack window gather, so one batch claim fills them.

        Finishes of a backlog land together (``FinishBatcher``), so their slots free together
        too; claiming each as it frees would cost a command per task again.
        """
        assert self._slot_freed is not None
        if not self._backlogged or self.acks.window <= 0 or not self._running:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * self.acks.window
        while self._running and self.concurrency - len(self._running) < max(2, self.concurrency // 2):
            left = deadline - loop.time()
            if left <= 0:
                return
            self._slot_freed.clear()
            await self._until(self._slot_freed, timeout=left)

    async def _until(self, event: asyncio.Event, timeout: float) -> None:
        assert self._stopping is not None
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(event.wait())]
        waiters.append(asyncio.ensure_future(self._stopping.wait()))
        await self._first_of(waiters, timeout)

    async def _idle(self, wakeups: list[Wakeup], until: float) -> bool:
        """Sleep until a push or retry, a task ending (a free slot), a stop, a limit window ending,
        or the next maintenance round."""
        assert self._stopping is not None and self._slot_freed is not None
        timeout = max(until, 0.0)
        blocked = [
            wait
            for c in self.task_classes
            if (wait := c.task_store().blocks.ready_in(c.task_store().now().timestamp())) > 0
        ]
        if blocked:
            timeout = min(timeout, *blocked)
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(w.wait()) for w in wakeups]
        waiters.append(asyncio.ensure_future(self._stopping.wait()))
        if self._room_was_short or not all(w.streaming for w in wakeups) or self._limited:
            # A task ending can make work claimable that no change event announces: a class
            # at its cap, a freed limit slot, or a dependent a poll would only see later.
            waiters.append(asyncio.ensure_future(self._slot_freed.wait()))
        woken = await self._first_of(waiters, timeout)
        # A stream that (re)opened may have missed changes while it was down: that counts as a wake.
        return woken or any(w.opened for w in wakeups)

    @staticmethod
    async def _first_of(waiters: list[asyncio.Future[Any]], timeout: float) -> bool:
        """Wait for the first waiter; True if one reported a wake (not a timeout of its own)."""
        try:
            done, _ = await asyncio.wait(waiters, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED)
            return any(not w.cancelled() and w.exception() is None and w.result() is not False for w in done)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _maintain(self, *, sweep: bool) -> None:
        """Recover expired leases (and the limit slots they held), tell dependents a dead finisher
        did not; now and then set aside unclaimable documents.

        One probe per database finds what needs it (``maintenance``), so an idle round costs
        one command however many classes the worker runs. A repair that fails is logged and
        the others go on; a lost connection is the claim loop's business (it waits for the server).
        """
        classes = [
            maintenance.Maintained(c.task_store(), has_links=bool(dependencies.declared_links(c)))
            for c in self.task_classes
        ]
        report = await maintenance.maintain(classes, who=f"worker {self.consumer_id}", sweep=sweep)
        if report.failures:
            self.stats["maintenance failed"] += report.failures

    async def _claim_next(self, *, only_one: bool = False) -> bool:
        """Claim, trying classes (and partitions) round-robin from where the last claim left off.

        One task at a time (one ``findAndModify``) until a queue shows a backlog; then every
        free slot is claimed in one go (a batch claim: three commands whatever the count).
        ``only_one`` (the quiet worker's safety net) tries the next queue alone, and moves
        the turn on, so the next safety net tries the one after it.
        """
        count = len(self._queues)
        free = self.concurrency - len(self._running)
        self._room_was_short = False
        if only_one:
            self._next_class = (self._next_class + 1) % count
        for offset in range(1 if only_one else count):
            index = (self._next_class + offset) % count
            task_class, partition = self._queues[index]
            room = free
            cap = task_class.task_options.concurrency
            if cap is not None:
                room = min(room, cap - sum(type(r.task) is task_class for r in self._running.values()))
            if room <= 0:
                self._room_was_short = True
                continue
            limited = task_class.task_store().limits.active  # limited classes are claimed one candidate at a time
            wanted = min(room, MAX_BATCH) if index in self._backlogged and not limited else 1
            try:
                tasks = await claim(task_class, wanted, consumer_id=self.consumer_id, partition=partition)
            except ConnectionFailure:
                raise
            except PyMongoError as exc:  # a refusal about this class's data: the other classes are still claimed
                self.stats["claim failed"] += 1
                log.error("worker %s: claiming %s failed: %s", self.consumer_id, task_class.__name__, exc)
                continue
            if len(tasks) == wanted:
                self._backlogged.add(index)
            else:
                self._backlogged.discard(index)
            if not tasks:
                continue
            self._next_class = (index + 1) % count
            for task in tasks:
                self._start(task)
            return True
        return False

    # -------------------------------------------------------- one task

    def _start(self, task: Task) -> None:
        record = _Running(task)
        job = asyncio.create_task(self._execute(record))
        self._running[job] = record
        job.add_done_callback(self._forget)
        self.stats["started"] += 1

    def _forget(self, job: asyncio.Task[None]) -> None:
        self._running.pop(job, None)
        if self._slot_freed is not None:
            self._slot_freed.set()
        if not job.cancelled() and job.exception() is not None:
            log.error("worker %s: unexpected error around a task", self.consumer_id, exc_info=job.exception())

    async def _execute(self, record: _Running) -> None:
        task = record.task
        name = f"{type(task).__name__} {task.id}"
        timeout = type(task).task_options.timeout
        if self.hooks:
            await self.hooks.before_run(task)
        began = time.monotonic()
        record.handle = self._sync_handle(task)
        record.runner = runner = asyncio.ensure_future(self._invoke(record))
        keep_alive = asyncio.create_task(self._keep_alive(record))
        try:
            await self._run_within(record, timeout)
            if not runner.done():
                record.stopped_because = record.stopped_because or "timeout"
                runner.cancel()
            with contextlib.suppress(BaseException):
                await runner
            if record.handle is not None:
                await record.handle.ended()  # a thread cannot be stopped: its slot and lease wait for it
        finally:
            record.duration = time.monotonic() - began
            keep_alive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keep_alive
        if self.hooks:
            kind, error = self._outcome(record)
            if kind == "raised":
                await self.hooks.on_exception(task, error)
        settle_started = time.time_ns()
        status = NOT_RECORDED
        try:
            status = await self._settle_patiently(record, name, timeout)
        except TaskCancelled:
            status = CANCELLED
            self.stats["cancelled"] += 1
            log.info("%s was cancelled while it ran; its outcome was dropped", name)
        except LeaseLost as exc:
            status = LEASE_LOST
            self.stats["lease lost"] += 1
            log.error("%s: %s; another worker owns it now, this outcome was dropped", name, exc)
        except TransitionError as exc:
            self.stats["vanished"] += 1
            log.warning("%s: %s; nothing to record", name, exc)
        except PyMongoError as exc:
            self.stats["unsettled"] += 1
            log.error("%s: could not record its outcome (%s); its lease will expire and it will be retried", name, exc)
        finally:
            if not task.is_settled:  # cancelled, lease lost or unsettled: its concurrency slot is free now
                with contextlib.suppress(PyMongoError):
                    await type(task).task_store().release_slot_of(task.concurrency_key, task.lease_token)
        if self.hooks:
            kind, value = self._outcome(record)
            outcome = Outcome(
                status,
                record.duration,
                error=value if kind == "raised" else record.stopped_because,
                result=value if kind == "returned" else None,
                settle_started_ns=settle_started,
                settle_ended_ns=time.time_ns(),
            )
            await self.hooks.after_run(task, outcome)

    @staticmethod
    async def _run_within(record: _Running, timeout: float | None) -> None:
        """Wait for run() to end, or for ``timeout`` seconds counted from the moment it really started."""
        runner = record.runner
        assert runner is not None
        if timeout is None:
            await asyncio.wait({runner})
            return
        if record.handle is not None:
            await asyncio.wait({runner, record.handle.started}, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.wait({runner}, timeout=timeout)

    async def _settle_patiently(self, record: _Running, name: str, timeout: float | None) -> str:
        """Settle, retrying a write lost to the network instead of waiting out the lease; returns the status."""
        for delay in (*SETTLE_RETRY_DELAYS, None):
            try:
                return await self._settle(record, name, timeout)
            except PyMongoError as exc:
                retryable = isinstance(exc, ConnectionFailure) or exc.has_error_label("RetryableWriteError")
                if delay is None or not retryable:
                    raise
                self.stats["settle retried"] += 1
                reason = redact_text(str(exc))
                log.warning("%s: could not record its outcome (%s); trying again in %g s", name, reason, delay)
                await asyncio.sleep(delay)
        return NOT_RECORDED  # not reached: the last attempt returns or raises

    @staticmethod
    def _outcome(record: _Running) -> tuple[str, Any]:
        """How run() ended: ("returned", value), ("raised", error) or ("stopped", None)."""
        runner = record.runner
        assert runner is not None
        if isinstance(record.handle, ThreadRun):
            future = record.handle.future
            if future.cancelled():
                return "stopped", None
            error = future.exception()
            return ("raised", error) if error is not None else ("returned", future.result())
        if runner.cancelled():
            # Cancelled by this worker, or run() raised CancelledError itself (a failed attempt then).
            return ("stopped", None) if record.stopped_because else ("raised", asyncio.CancelledError())
        error = runner.exception()
        return ("raised", error) if error is not None else ("returned", runner.result())

    async def _settle(self, record: _Running, name: str, timeout: float | None) -> str:
        """Write the outcome of one run: finish, fail (retry policy), release, or nothing; returns the status."""
        task = record.task
        reason = record.stopped_because
        kind, value = self._outcome(record)
        settled_by_run = task.is_settled
        if reason == "cancelled":
            self.stats["cancelled"] += 1
            how = (
                "its thread could not be interrupted: the slot was held until run() returned, and its result dropped"
                if isinstance(record.handle, ThreadRun)
                else "run() was stopped"
            )
            log.info("%s was cancelled while running; %s", name, how)
        elif reason == "lease lost":
            self.stats["lease lost"] += 1
        elif task.is_settled:
            self.stats[task.state.value.lower()] += 1  # run() settled the task itself
        elif reason == "timeout":
            await task.fail(f"timed out after {timeout:g} s", retry=type(task).task_options.retries(TimeoutError()))
            self.stats["timed out"] += 1
            self._log_failure(record, name, f"timed out after {timeout:g} s")
        elif kind == "returned":  # once run() has returned, its outcome is recorded, shutdown or not
            if len(self._running) > 1:  # others may end within the ack window and share the write
                await self.acks.finish(task, value)
            else:
                await task.finish(value)
            self.stats[task.state.value.lower()] += 1
            if task.state is State.FINISHED:
                took = (task.attempts, record.duration)
                log.info("%s finished (attempt %d, %.3f s)", name, *took, extra=_fields(record))
            else:  # the result could not be stored
                self._log_failure(record, name, task.error)
        elif reason == "shutdown" or kind == "stopped":
            await task.release()
            self.stats["released"] += 1
            log.warning("%s did not finish within the grace period; released for another worker", name)
            return RELEASED
        else:
            if isinstance(value, LeaseLost):
                raise value
            if isinstance(value, asyncio.CancelledError):
                value = "run() raised CancelledError itself (a cancelled child task or library call)"
            value = explain_error(value)
            await task.fail(value)
            self.stats["failed" if task.state.is_terminal else "retrying"] += 1
            self._log_failure(record, name, value)
        # Back in CREATED: a retry, unless run() settled the task itself without raising or an error (a release).
        # A release gives the attempt back; a failed attempt that will be retried keeps it.
        failed = not settled_by_run or kind == "raised" or task.attempts >= record.attempts_at_claim
        return {"cancelled": CANCELLED, "lease lost": LEASE_LOST}.get(reason or "", _status_of(task, failed=failed))

    @staticmethod
    def _log_failure(record: _Running, name: str, error: BaseException | str | None) -> None:
        """One line per failed attempt: WARNING while it will be retried, ERROR with the traceback when final."""
        task = record.task
        limit = task.max_attempts or type(task).task_options.max_attempts
        reason = redact_text(describe_error(error) or "no error given")
        fields = _fields(record)
        if task.state.is_terminal:
            trace = error if isinstance(error, BaseException) else None
            log.error(
                "%s failed for good (attempt %d of %d, %.3f s): %s",
                name, task.attempts, limit, record.duration, reason, exc_info=trace, extra=fields,
            )  # fmt: skip
        else:
            log.warning(
                "%s failed (attempt %d of %d, %.3f s), will retry: %s",
                name, task.attempts, limit, record.duration, reason, extra=fields,
            )  # fmt: skip

    def _sync_handle(self, task: Task) -> ThreadRun | ProcessRun | None:
        """For a plain ``def run()``: its thread (started now) or its child process; None for ``async def``."""
        if inspect.iscoroutinefunction(type(task).run):
            return None
        if type(task).task_options.executor == "process":
            return ProcessRun(task)
        assert self._executor is not None
        return ThreadRun(self._executor, task.run)

    @staticmethod
    async def _invoke(record: _Running) -> Any:
        if record.handle is None:
            return await record.task.run()
        return await record.handle.result()

    async def _keep_alive(self, record: _Running) -> None:
        """Heartbeat while run() works; stop run() at once if the task was cancelled or the lease lost.

        A sync handler's thread is heartbeaten until it returns, whatever stopped the wait
        for it, so no other worker can take the task while the thread still runs.
        """
        task, runner = record.task, record.runner
        assert runner is not None
        every = type(task).task_options.heartbeat_every
        while not record.handler_ended():
            await asyncio.sleep(every)
            if record.handler_ended():
                return
            try:
                await task.heartbeat()
            except TaskCancelled:
                record.stopped_because = "cancelled"
            except LeaseLost as exc:
                record.stopped_because = "lease lost"
                log.error("%s %s: %s; stopping its run()", type(task).__name__, task.id, exc)
            except (PyMongoError, TransitionError) as exc:
                log.warning("%s %s: could not extend the lease (%s); will try again", type(task).__name__, task.id, exc)
                continue
            else:
                continue
            runner.cancel()
            return

    async def _drain(self) -> None:
        """Give running tasks the grace period, then release the rest unspent.

        A task whose run() has already returned is left to record its outcome. A sync
        handler's thread cannot be stopped: the worker waits for it (heartbeating its
        lease) rather than let another worker run the task at the same time.
        """
        if not self._running:
            return
        log.info("draining %d running task(s) for up to %g s", len(self._running), self.grace_period)
        _done, pending = await asyncio.wait(list(self._running), timeout=self.grace_period)
        if not pending:
            return
        for job in pending:
            record = self._running.get(job)
            if record is not None and record.runner is not None and not record.runner.done():
                record.stopped_because = record.stopped_because or "shutdown"
                record.runner.cancel()
        _done, stuck = await asyncio.wait(pending, timeout=RELEASE_TIMEOUT)
        threads = [job for job in stuck if (record := self._running.get(job)) is not None and record.thread_running()]
        if threads:
            log.warning(
                "waiting for %d sync run() thread(s) to return; their tasks keep their leases until then "
                "(a second signal exits at once, and they are delivered again after the lease expires)",
                len(threads),
            )
            await asyncio.wait(threads)
        for job in stuck:
            if job not in threads:
                job.cancel()
