"""Prometheus metrics (the ``metrics`` extra, ``prometheus-client``): off unless installed and enabled.

``Metrics`` is middleware (``hooks``): it counts pushes and each run's outcome, and
times runs and queue waits, in memory, so the hot path sends no extra command. Queue
depth and the age of the oldest ready task are read from MongoDB by ``QueueStats`` in
the background, at most every ``every`` seconds, and served from that cache on scrape.
``serve`` exposes ``/metrics``, ``/healthz`` (liveness) and ``/readyz`` (readiness) for
a worker; ``asgi_app`` gives the same ``/metrics`` to mount in an ASGI app (the dashboard).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from pymongo.errors import PyMongoError

from beanie_tasks import admin, hooks
from beanie_tasks.redact import get_logger, redact_text

try:
    import prometheus_client
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError as missing:  # pragma: no cover - exercised only without the extra
    raise ImportError("beanie_tasks.metrics needs prometheus-client: pip install 'beanie-tasks[metrics]'") from missing

if TYPE_CHECKING:
    from beanie_tasks.task import Task
    from beanie_tasks.worker import Worker

log = get_logger("beanie_tasks.metrics")

PREFIX = "beanie_tasks"
# Run durations and queue waits span milliseconds to hours.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
QUEUE_STATS_EVERY = 15.0
# /healthz fails when the worker's claim loop has not gone round for this long.
STALE_AFTER = 60.0
# Which counter each outcome status adds to.
_OUTCOME_COUNTERS = {
    hooks.FINISHED: "finished",
    hooks.FAILED: "failed",
    hooks.RETRYING: "retried",
    hooks.CANCELLED: "cancelled",
    hooks.RELEASED: "released",
}


class Metrics(hooks.Middleware):
    """The counters, histograms and gauges of one process, in ``registry`` (a fresh one by default).

    Give it to a worker (``Worker(..., middleware=[metrics])``, or ``metrics.attach(worker)``,
    which also counts pushes and starts ``QueueStats``).
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, buckets: Sequence[float] = BUCKETS) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        label = ["task_class"]
        self.pushed = prometheus_client.Counter(
            f"{PREFIX}_pushed", "Tasks pushed by this process.", label, registry=self.registry
        )
        self.started = prometheus_client.Counter(
            f"{PREFIX}_started", "Runs started by this worker.", label, registry=self.registry
        )
        self.finished = prometheus_client.Counter(
            f"{PREFIX}_finished", "Runs that finished their task.", label, registry=self.registry
        )
        self.failed = prometheus_client.Counter(
            f"{PREFIX}_failed", "Runs that failed their task for good (it is FAILED).", label, registry=self.registry
        )
        self.retried = prometheus_client.Counter(
            f"{PREFIX}_retried", "Runs that failed an attempt; the task will be retried.", label, registry=self.registry
        )
        self.cancelled = prometheus_client.Counter(
            f"{PREFIX}_cancelled", "Runs stopped because their task was cancelled.", label, registry=self.registry
        )
        self.released = prometheus_client.Counter(
            f"{PREFIX}_released", "Runs given back unfinished at shutdown.", label, registry=self.registry
        )
        self.run_duration = prometheus_client.Histogram(
            f"{PREFIX}_run_duration_seconds", "How long run() took.", label, buckets=buckets, registry=self.registry
        )
        self.queue_wait = prometheus_client.Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "From when a task was due to when a worker started it.",
            label,
            buckets=buckets,
            registry=self.registry,
        )
        self.in_progress = prometheus_client.Gauge(
            f"{PREFIX}_in_progress", "Tasks this worker is running now.", label, registry=self.registry
        )
        self.queue_stats = QueueStats()
        self.registry.register(self.queue_stats)

    # --------------------------------------------------------- middleware

    def before_push(self, task: Task) -> None:
        """Nothing to do before the insert; ``after_push`` counts what was stored."""

    def after_push(self, task: Task, error: BaseException | None) -> None:
        if error is None:
            self.pushed.labels(type(task).__name__).inc()

    def before_run(self, task: Task) -> None:
        name = type(task).__name__
        self.started.labels(name).inc()
        self.in_progress.labels(name).inc()
        if task.started_at is not None and task.run_at is not None:
            self.queue_wait.labels(name).observe(max((task.started_at - task.run_at).total_seconds(), 0.0))

    def after_run(self, task: Task, outcome: hooks.Outcome) -> None:
        name = type(task).__name__
        self.in_progress.labels(name).dec()
        self.run_duration.labels(name).observe(outcome.duration)
        counter = _OUTCOME_COUNTERS.get(outcome.status)
        if counter is not None:
            getattr(self, counter).labels(name).inc()

    # ------------------------------------------------------------ wiring

    def attach(self, worker: Worker, *, queue_stats_every: float | None = QUEUE_STATS_EVERY) -> None:
        """Measure ``worker``'s runs and this process's pushes; refresh queue stats while it runs.

        ``queue_stats_every=None`` leaves queue depth out (no command is ever sent for it).
        """
        if self not in worker.hooks.middleware:
            worker.hooks.middleware.append(self)
        hooks.add_push_middleware(self)
        if queue_stats_every is None:
            return
        refresher: list[asyncio.Task[None]] = []

        async def start(running: Worker) -> None:
            refresher.append(asyncio.create_task(self.queue_stats.keep_fresh(running.task_classes, queue_stats_every)))

        async def stop(running: Worker) -> None:
            for job in refresher:
                job.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await job

        worker.lifecycle.on_startup.append(start)
        worker.lifecycle.on_shutdown.insert(0, stop)

    def detach(self) -> None:
        """Stop counting this process's pushes."""
        hooks.remove_push_middleware(self)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (what a scrape of ``/metrics`` returns)."""
        return prometheus_client.generate_latest(self.registry)


@dataclass(eq=False)  # a registry keys its collectors by identity
class QueueStats(Collector):
    """Queue depth per class and state, and the oldest ready task's age, from a cache refreshed in the background.

    A scrape reads the cache only: it never waits for MongoDB, and many scrapes cost no more
    than one refresh every ``every`` seconds.
    """

    depth: dict[tuple[str, str], int] = field(default_factory=dict)
    oldest_ready: dict[str, float] = field(default_factory=dict)
    refreshed_at: float | None = None  # time.time() of the last refresh that worked

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Tasks per class and state (read from MongoDB).", labels=["task_class", "state"]
        )
        for (name, state), count in sorted(self.depth.items()):
            depth.add_metric([name, state], count)
        oldest = GaugeMetricFamily(
            f"{PREFIX}_oldest_ready_age_seconds",
            "How long the oldest ready (CREATED and due) task has waited; 0 when none waits.",
            labels=["task_class"],
        )
        for name, seconds in sorted(self.oldest_ready.items()):
            oldest.add_metric([name], seconds)
        age = GaugeMetricFamily(
            f"{PREFIX}_queue_stats_age_seconds", "Seconds since queue depth was last read from MongoDB."
        )
        if self.refreshed_at is not None:
            age.add_metric([], max(time.time() - self.refreshed_at, 0.0))
        yield from (depth, oldest, age)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # collected lazily: nothing to check at registration

    async def refresh(self, task_classes: Sequence[type[Task]]) -> None:
        """Read counts and the oldest ready task of each class: two commands per class."""
        depth: dict[tuple[str, str], int] = {}
        oldest: dict[str, float] = {}
        for task_class in task_classes:
            task_store = task_class.task_store()
            now = task_store.now()
            for state, count in (await admin.counts(task_store)).items():
                depth[(task_class.__name__, state.value)] = count
            ready = await task_store.oldest_ready(now)
            oldest[task_class.__name__] = max((now - ready).total_seconds(), 0.0) if ready is not None else 0.0
        self.depth, self.oldest_ready, self.refreshed_at = depth, oldest, time.time()

    async def keep_fresh(self, task_classes: Sequence[type[Task]], every: float = QUEUE_STATS_EVERY) -> None:
        """Refresh every ``every`` seconds until cancelled; a failed refresh keeps the last numbers."""
        while True:
            try:
                await self.refresh(task_classes)
            except (PyMongoError, asyncio.TimeoutError) as exc:
                log.warning("queue stats not refreshed: %s", redact_text(str(exc)))
            await asyncio.sleep(every)


# -------------------------------------------------------------- health


@dataclass(frozen=True)
class Health:
    alive: bool
    ready: bool
    running: int
    last_tick_seconds_ago: float | None

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "status": "ok" if self.alive and self.ready else ("alive" if self.alive else "stalled"),
                "alive": self.alive,
                "ready": self.ready,
                "running": self.running,
                "last_tick_seconds_ago": self.last_tick_seconds_ago,
            }
        ).encode()


def health_of(worker: Worker, *, since: float, stale_after: float = STALE_AFTER) -> Health:
    """Alive: the claim loop went round within ``stale_after`` seconds (counted from ``since`` before its
    first round). Ready: started, reaching the server and not stopping."""
    now = time.monotonic()
    tick = worker.last_tick if worker.last_tick is not None else since
    age = now - tick
    ago = round(age, 3) if worker.last_tick is not None else None
    return Health(alive=age < stale_after, ready=worker.ready, running=worker.running, last_tick_seconds_ago=ago)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` over HTTP for one worker, in a daemon thread."""

    def __init__(
        self,
        metrics: Metrics,
        worker: Worker,
        *,
        host: str = "0.0.0.0",
        port: int = 9100,
        stale_after: float = STALE_AFTER,
    ) -> None:
        since = time.monotonic()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, prometheus_client.CONTENT_TYPE_LATEST, metrics.exposition())
                elif path in ("/healthz", "/readyz"):
                    health = health_of(worker, since=since, stale_after=stale_after)
                    good = health.alive if path == "/healthz" else health.alive and health.ready
                    self._reply(200 if good else 503, "application/json", health.as_json())
                else:
                    self._reply(404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n")

            def _reply(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Scrapes are not worth a log line each."""

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="beanie-tasks-metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(
    metrics: Metrics, worker: Worker, *, host: str = "0.0.0.0", port: int = 9100, stale_after: float = STALE_AFTER
) -> MetricsServer:
    """Start serving ``/metrics``, ``/healthz`` and ``/readyz`` for ``worker`` (port 0 picks a free one)."""
    return MetricsServer(metrics, worker, host=host, port=port, stale_after=stale_after).start()


def asgi_app(registry: CollectorRegistry | None = None) -> Any:
    """An ASGI app serving ``registry`` (the default one when None) in Prometheus' format, to mount at ``/metrics``."""
    return prometheus_client.make_asgi_app(registry=registry if registry is not None else prometheus_client.REGISTRY)
