"""Prometheus metrics: a real scrape of /metrics over HTTP after tasks ran, health endpoints, cached queue stats."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from beanie_tasks import Backoff, State, Task, Worker
from beanie_tasks.metrics import Metrics, QueueStats, asgi_app, serve
from beanie_tasks.testing import eventually, running


class MetricEmail(Task):
    async def run(self) -> str:
        await asyncio.sleep(0.01)
        return "sent"


class MetricFlaky(Task):
    class TaskSettings:
        max_attempts = 2
        backoff = Backoff(base=0.05, jitter=0.0)

    async def run(self) -> None:
        raise RuntimeError("always")


class MetricWaiting(Task):
    """Never run here: it only sits in the queue, to be counted."""

    async def run(self) -> None:
        return None


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(MetricEmail, MetricFlaky, MetricWaiting)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


async def ended(task_class: type[Task], task_id: Any) -> Task | None:
    stored = await task_class.get(task_id)
    return stored if stored is not None and stored.state.is_terminal else None


async def test_a_scrape_after_tasks_ran_counts_them_by_class() -> None:
    metrics = Metrics()
    worker = Worker([MetricEmail, MetricFlaky])
    metrics.attach(worker, queue_stats_every=0.2)
    server = serve(metrics, worker, host="127.0.0.1", port=0)
    try:
        emails = [await MetricEmail().push() for _ in range(3)]
        flaky = await MetricFlaky().push()
        await MetricWaiting().push()
        async with running(worker):
            for email in emails:
                await eventually(lambda e=email: ended(MetricEmail, e.id))  # type: ignore[misc]
            await eventually(lambda: ended(MetricFlaky, flaky.id))

            async def depth_read() -> Any:
                found = await scrape(server.port)
                finished = ("beanie_tasks_queue_depth", (("state", "FINISHED"), ("task_class", "MetricEmail")))
                failed = ("beanie_tasks_queue_depth", (("state", "FAILED"), ("task_class", "MetricFlaky")))
                return found if found.get(finished) == 3 and found.get(failed) == 1 else None

            samples = await eventually(depth_read)
    finally:
        metrics.detach()
        server.close()

    def value(name: str, task_class: str) -> float:
        return samples.get((name, (("task_class", task_class),)), 0.0)

    assert value("beanie_tasks_pushed_total", "MetricEmail") == 3
    assert value("beanie_tasks_pushed_total", "MetricWaiting") == 1
    assert value("beanie_tasks_started_total", "MetricEmail") == 3
    assert value("beanie_tasks_finished_total", "MetricEmail") == 3
    assert value("beanie_tasks_started_total", "MetricFlaky") == 2
    assert value("beanie_tasks_retried_total", "MetricFlaky") == 1
    assert value("beanie_tasks_failed_total", "MetricFlaky") == 1
    assert value("beanie_tasks_cancelled_total", "MetricEmail") == 0
    assert value("beanie_tasks_in_progress", "MetricEmail") == 0
    assert value("beanie_tasks_run_duration_seconds_count", "MetricEmail") == 3
    assert value("beanie_tasks_run_duration_seconds_sum", "MetricEmail") >= 0.03
    assert value("beanie_tasks_queue_wait_seconds_count", "MetricEmail") == 3
    # The worker runs MetricEmail and MetricFlaky: their queues are read from MongoDB and cached.
    depth = {labels: v for (name, labels), v in samples.items() if name == "beanie_tasks_queue_depth"}
    assert depth[(("state", "FAILED"), ("task_class", "MetricFlaky"))] == 1
    assert depth[(("state", "CREATED"), ("task_class", "MetricEmail"))] == 0
    assert value("beanie_tasks_oldest_ready_age_seconds", "MetricEmail") == 0
    assert samples[("beanie_tasks_queue_stats_age_seconds", ())] >= 0


async def test_oldest_ready_age_reports_the_longest_waiting_task() -> None:
    stats = QueueStats()
    await MetricWaiting().push(run_at=MetricWaiting.task_store().now().replace(year=2000))
    await stats.refresh([MetricWaiting])
    assert stats.depth[("MetricWaiting", State.CREATED.value)] == 1
    assert stats.oldest_ready["MetricWaiting"] > 365 * 24 * 3600


@pytest.mark.wire
async def test_a_scrape_sends_no_command_and_a_refresh_two_per_class(backend: Any) -> None:
    await MetricWaiting().push()
    metrics = Metrics()
    backend.counter.reset()
    await metrics.queue_stats.refresh([MetricWaiting, MetricEmail])
    assert backend.counter.total == 4, backend.counter.commands
    backend.counter.reset()
    for _ in range(5):
        text = metrics.exposition().decode()
    assert backend.counter.total == 0
    assert 'beanie_tasks_queue_depth{state="CREATED",task_class="MetricWaiting"} 1.0' in text


async def test_healthz_follows_the_claim_loop_and_readyz_the_connection_and_shutdown() -> None:
    metrics = Metrics()
    worker = Worker([MetricEmail])
    server = serve(metrics, worker, host="127.0.0.1", port=0, stale_after=30)
    base = f"http://127.0.0.1:{server.port}"
    try:
        status, body = await asyncio.to_thread(get, f"{base}/readyz")
        assert status == 503 and json.loads(body)["ready"] is False  # not started yet
        async with running(worker):
            await eventually(lambda: asyncio.sleep(0, result=worker.ready))
            status, body = await asyncio.to_thread(get, f"{base}/healthz")
            assert status == 200 and json.loads(body) | {"last_tick_seconds_ago": 0} == {
                "status": "ok",
                "alive": True,
                "ready": True,
                "running": 0,
                "last_tick_seconds_ago": 0,
            }
            assert (await asyncio.to_thread(get, f"{base}/readyz"))[0] == 200
        status, body = await asyncio.to_thread(get, f"{base}/readyz")
        assert status == 503 and json.loads(body)["ready"] is False  # stopped
        assert (await asyncio.to_thread(get, f"{base}/nope"))[0] == 404
    finally:
        server.close()


async def test_a_stalled_loop_fails_liveness() -> None:
    metrics = Metrics()
    worker = Worker([MetricEmail])
    server = serve(metrics, worker, host="127.0.0.1", port=0, stale_after=0.5)
    try:
        worker.last_tick = 0.0  # the claim loop last went round at boot: long ago
        status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{server.port}/healthz")
        assert status == 503 and json.loads(body)["alive"] is False and json.loads(body)["status"] == "stalled"
    finally:
        server.close()


async def test_the_asgi_app_serves_the_same_registry() -> None:
    metrics = Metrics()
    metrics.after_push(MetricEmail(), None)
    app = asgi_app(metrics.registry)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": []}
    await app(scope, receive, send)
    assert sent[0]["status"] == 200
    body = b"".join(m.get("body", b"") for m in sent[1:]).decode()
    assert 'beanie_tasks_pushed_total{task_class="MetricEmail"} 1.0' in body
