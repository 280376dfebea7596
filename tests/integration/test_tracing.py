"""OpenTelemetry spans from the SDK's in-memory exporter: one trace from the request that pushed to the worker."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from beanie_tasks import Task, Worker
from beanie_tasks.testing import eventually, running
from beanie_tasks.tracing import Tracing


class Traces:
    provider: ClassVar[TracerProvider]
    exporter: ClassVar[InMemorySpanExporter]


class TracedEmail(Task):
    to: str

    async def run(self) -> str:
        with Traces.provider.get_tracer("app").start_as_current_span("render template"):
            return f"sent to {self.to}"


class TracedSync(Task):
    def run(self) -> str:  # in a worker thread: it still sees the process span
        with Traces.provider.get_tracer("app").start_as_current_span("blocking work"):
            return "done"


class TracedBroken(Task):
    def run(self) -> None:
        raise PermissionError("mailbox full")


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> Any:
    Traces.exporter = InMemorySpanExporter()
    Traces.provider = TracerProvider()
    Traces.provider.add_span_processor(SimpleSpanProcessor(Traces.exporter))
    await init_tasks(TracedEmail, TracedSync, TracedBroken)


@pytest.fixture
def tracing() -> Any:
    traced = Tracing(Traces.provider).install()
    yield traced
    traced.uninstall()


def spans() -> dict[str, ReadableSpan]:
    return {span.name: span for span in Traces.exporter.get_finished_spans()}


async def ended(task_class: type[Task], task_id: Any) -> Task | None:
    stored = await task_class.get(task_id)
    return stored if stored is not None and stored.state.is_terminal else None


async def test_one_trace_runs_from_the_request_that_pushed_through_the_worker(tracing: Tracing) -> None:
    with Traces.provider.get_tracer("app").start_as_current_span("POST /signup"):
        pushed = await TracedEmail(to="ada@example.com").push()
    assert pushed.trace_context is not None and "traceparent" in pushed.trace_context
    stored = await TracedEmail.get(pushed.id)
    assert stored is not None and stored.trace_context == pushed.trace_context  # stored by the insert itself

    async with running(Worker([TracedEmail], middleware=[tracing])):
        await eventually(lambda: ended(TracedEmail, pushed.id))
        settled = f"settle {TracedEmail.collection().name}"
        found = await eventually(lambda: _async(spans() if settled in spans() else None))

    collection = TracedEmail.collection().name
    request, send = found["POST /signup"], found[f"send {collection}"]
    process, settle, inner = found[f"process {collection}"], found[f"settle {collection}"], found["render template"]
    trace_ids = {span.context.trace_id for span in (request, send, process, settle, inner)}
    assert len(trace_ids) == 1, "every span belongs to the producer's trace"
    assert send.parent is not None and send.parent.span_id == request.context.span_id
    assert process.parent is not None and process.parent.span_id == send.context.span_id
    assert settle.parent is not None and settle.parent.span_id == process.context.span_id
    assert inner.parent is not None and inner.parent.span_id == process.context.span_id  # run()'s own spans
    assert (send.kind, process.kind, settle.kind) == (SpanKind.PRODUCER, SpanKind.CONSUMER, SpanKind.CLIENT)
    for span, operation in ((send, "send"), (process, "process"), (settle, "settle")):
        assert span.attributes is not None
        assert span.attributes["messaging.system"] == "beanie_tasks"
        assert span.attributes["messaging.destination.name"] == collection
        assert span.attributes["messaging.message.id"] == str(pushed.id)
        assert span.attributes["messaging.operation.type"] == operation
        assert "error.type" not in span.attributes
    assert settle.start_time is not None and process.end_time is not None and settle.start_time <= process.end_time


async def test_a_failed_run_records_the_error_type_on_process_and_settle(tracing: Tracing) -> None:
    pushed = await TracedBroken().push()
    async with running(Worker([TracedBroken], middleware=[tracing])):
        await eventually(lambda: ended(TracedBroken, pushed.id))
        found = await eventually(lambda: _async(spans() if len(spans()) >= 3 else None))
    collection = TracedBroken.collection().name
    process, settle = found[f"process {collection}"], found[f"settle {collection}"]
    assert process.attributes is not None and settle.attributes is not None
    assert process.attributes["error.type"] == "PermissionError" == settle.attributes["error.type"]
    assert process.status.status_code is StatusCode.ERROR
    assert settle.attributes["messaging.operation.name"] == "fail"
    assert [event.name for event in process.events] == ["exception"]


async def test_spans_in_a_sync_handlers_thread_are_children_of_process(tracing: Tracing) -> None:
    pushed = await TracedSync().push()
    async with running(Worker([TracedSync], middleware=[tracing])):
        await eventually(lambda: ended(TracedSync, pushed.id))
        found = await eventually(lambda: _async(spans() if len(spans()) >= 4 else None))
    process, inner = found[f"process {TracedSync.collection().name}"], found["blocking work"]
    assert inner.parent is not None and inner.parent.span_id == process.context.span_id


async def test_without_tracing_nothing_is_stored_or_exported() -> None:
    pushed = await TracedEmail(to="bob@example.com").push()
    async with running(Worker([TracedEmail])):
        await eventually(lambda: ended(TracedEmail, pushed.id))
    stored = await TracedEmail.get(pushed.id)
    assert stored is not None and stored.trace_context is None
    assert [span.name for span in Traces.exporter.get_finished_spans()] == ["render template"]


async def _async(value: Any) -> Any:
    return value
