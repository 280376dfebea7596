"""OpenTelemetry traces (the ``otel`` extra, ``opentelemetry-api``): off unless installed and enabled.

``Tracing`` is middleware (``hooks``) following the messaging semantic conventions: a
``send`` span (PRODUCER) around each push, a ``process`` span (CONSUMER) around each
run, and a ``settle`` span (CLIENT) for the write that records a finish or a failure.
The push stores the trace context (W3C ``traceparent``) on the task, in the same insert,
so the worker's spans join the producer's trace: one trace from the web request that
pushed a task to the worker that ran it. Spans inside ``run()`` are children of ``process``.
No command is added: the context rides in the task document.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from beanie_tasks import hooks

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError as missing:  # pragma: no cover - exercised only without the extra
    raise ImportError("beanie_tasks.tracing needs opentelemetry-api: pip install 'beanie-tasks[otel]'") from missing

if TYPE_CHECKING:
    from beanie_tasks.task import Task

SYSTEM = "beanie_tasks"
# The outcomes that write the task's end (or its retry): each gets a settle span.
SETTLED = frozenset({hooks.FINISHED, hooks.FAILED, hooks.RETRYING})


def _destination(task: Task) -> str:
    return str(type(task).collection().name)


def _attributes(task: Task, operation: str, name: str) -> dict[str, Any]:
    return {
        "messaging.system": SYSTEM,
        "messaging.destination.name": _destination(task),
        "messaging.message.id": str(task.id),
        "messaging.operation.type": operation,
        "messaging.operation.name": name,
        "beanie_tasks.task_class": type(task).__name__,
    }


def _error_type(error: BaseException | str | None) -> str | None:
    if isinstance(error, BaseException):
        return type(error).__qualname__
    return error  # why the worker stopped run(): "timeout", "shutdown", "cancelled", "lease lost"


class Tracing(hooks.Middleware):
    """Spans for pushes and runs; ``tracer_provider`` defaults to the global one (a no-op until configured).

    Use ``Tracing().install()`` in producers (it traces every ``push()`` of the process) and
    ``Worker(..., middleware=[tracing])`` (or ``tracing.attach(worker)``) in workers.
    """

    def __init__(self, tracer_provider: Any = None) -> None:
        self.tracer = trace.get_tracer("beanie_tasks", tracer_provider=tracer_provider)
        self._pushes: dict[int, Any] = {}
        self._runs: dict[int, tuple[Any, object]] = {}

    def install(self) -> Tracing:
        """Trace every ``push()`` in this process."""
        hooks.add_push_middleware(self)
        return self

    def uninstall(self) -> None:
        hooks.remove_push_middleware(self)

    def attach(self, worker: Any) -> Tracing:
        """Trace ``worker``'s runs (and this process's pushes)."""
        if self not in worker.hooks.middleware:
            worker.hooks.middleware.append(self)
        return self.install()

    # ---------------------------------------------------------------- push

    def before_push(self, task: Task) -> None:
        span = self.tracer.start_span(
            f"send {_destination(task)}", kind=SpanKind.PRODUCER, attributes=_attributes(task, "send", "push")
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        task.trace_context = carrier or None
        self._pushes[id(task)] = span

    def after_push(self, task: Task, error: BaseException | None) -> None:
        span = self._pushes.pop(id(task), None)
        if span is None:
            return
        if error is not None:
            span.set_attribute("error.type", type(error).__qualname__)
            span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
        span.end()

    # ----------------------------------------------------------------- run

    def before_run(self, task: Task) -> None:
        parent = propagate.extract(task.trace_context or {})
        span = self.tracer.start_span(
            f"process {_destination(task)}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=_attributes(task, "process", "run") | {"beanie_tasks.attempt": task.attempts},
        )
        # The worker calls this in the task's own asyncio context, just before run() starts:
        # run() sees this span as the current one.
        token = otel_context.attach(trace.set_span_in_context(span))
        self._runs[id(task)] = (span, token)

    def on_exception(self, task: Task, error: BaseException) -> None:
        found = self._runs.get(id(task))
        if found is not None:
            found[0].record_exception(error)

    def after_run(self, task: Task, outcome: hooks.Outcome) -> None:
        found = self._runs.pop(id(task), None)
        if found is None:
            return
        span, token = found
        error_type = _error_type(outcome.error) if outcome.status != hooks.FINISHED else None
        if outcome.status in SETTLED:
            settle = self.tracer.start_span(
                f"settle {_destination(task)}",
                context=trace.set_span_in_context(span),
                kind=SpanKind.CLIENT,
                start_time=outcome.settle_started_ns,
                attributes=_attributes(task, "settle", "finish" if outcome.status == hooks.FINISHED else "fail")
                | {"beanie_tasks.outcome": outcome.status},
            )
            if error_type is not None:
                settle.set_attribute("error.type", error_type)
            settle.end(end_time=outcome.settle_ended_ns)
        span.set_attribute("beanie_tasks.outcome", outcome.status)
        if error_type is not None:
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR, outcome.status))
        span.end()
        otel_context.detach(token)  # type: ignore[arg-type]
