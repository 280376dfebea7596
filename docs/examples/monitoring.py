"""Monitoring a worker: JSON logs, Prometheus metrics and health over HTTP, OpenTelemetry traces across push and run."""

import asyncio
import io
import json
import urllib.request
import uuid

from beanie import init_beanie
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from beanie_tasks import State, Task, TaskFailed, Worker, logs
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.embedded import server_uri
from beanie_tasks.metrics import Metrics, serve
from beanie_tasks.tracing import Tracing

DATABASE = f"example_monitoring_{uuid.uuid4().hex[:8]}"


class Resize(Task):
    width: int

    async def run(self) -> str:
        if self.width <= 0:
            raise ValueError(f"width must be positive, got {self.width}")
        await asyncio.sleep(0.01)
        return f"resized to {self.width}px"


def fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.status, reply.read().decode()


async def main(uri: str) -> None:
    # Logs: what `beanie-tasks worker --log-format json` sets up (here into a buffer, to read it back).
    log_lines = io.StringIO()
    logs.configure("INFO", fmt="json", stream=log_lines)

    # Traces: an SDK provider with an in-memory exporter (use an OTLP exporter in production).
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider).install()  # every push() of this process stores its trace context

    client = client_for(uri)
    await init_beanie(database=client[DATABASE], document_models=[Resize])
    with provider.get_tracer("web").start_as_current_span("POST /upload"):
        good = await Resize(width=640).push()
    bad = await Resize(width=0).push()

    metrics = Metrics()  # its own registry; the CLI uses prometheus_client's default one
    worker = Worker([Resize], middleware=[tracing])
    metrics.attach(worker, queue_stats_every=0.5)  # counts runs and pushes; reads queue depth every 0.5 s
    server = serve(metrics, worker, host="127.0.0.1", port=0)  # `--metrics-port P` in the CLI
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        assert (await good.wait(timeout=30)).state is State.FINISHED
        try:
            await bad.wait(timeout=30)
        except TaskFailed as failed:  # wait() raises when the task ends FAILED
            assert failed.task.state is State.FAILED
        await asyncio.sleep(1.0)  # let the background refresh read the queue depth
        base = f"http://127.0.0.1:{server.port}"
        status, body = await asyncio.to_thread(fetch, f"{base}/metrics")
        print("GET /metrics ->", status)
        for line in body.splitlines():
            if line.startswith("beanie_tasks_") and ("_total" in line or "queue_depth" in line) and "Resize" in line:
                print("  ", line)
        assert 'beanie_tasks_finished_total{task_class="Resize"} 1.0' in body
        assert 'beanie_tasks_failed_total{task_class="Resize"} 1.0' in body
        assert 'beanie_tasks_queue_depth{state="FAILED",task_class="Resize"} 1.0' in body
        status, health = await asyncio.to_thread(fetch, f"{base}/healthz")
        print("GET /healthz ->", status, health)
        assert status == 200 and json.loads(health)["ready"] is True
    finally:
        stop.set()
        await running
        server.close()
        metrics.detach()
        tracing.uninstall()
        await client.drop_database(DATABASE)
        await close_client(client)

    records = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    finished = next(r for r in records if r.get("task_id") == str(good.id))
    failed = next(r for r in records if r.get("task_id") == str(bad.id))
    print("log line of the finished task:", json.dumps(finished))
    print("log line of the failed task has a traceback:", "traceback" in failed)
    assert finished["level"] == "INFO" and failed["level"] == "ERROR" and "traceback" in failed

    spans = exporter.get_finished_spans()
    print("spans:", ", ".join(sorted(span.name for span in spans)))
    request = next(span for span in spans if span.name == "POST /upload")
    one_trace = {span.name for span in spans if span.context.trace_id == request.context.trace_id}
    assert one_trace == {"POST /upload", "send Resize", "process Resize", "settle Resize"}, one_trace


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
