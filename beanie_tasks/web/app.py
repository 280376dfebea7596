"""The dashboard's ASGI app: ``dashboard(task_classes, ...)`` returns a Starlette app to mount or serve.

It keeps no state outside the request and needs no lifespan (a mounted sub-app's lifespan
never runs): the task classes must be initialised by the mounting app's ``init_beanie``.
Every read and write goes through ``store`` and ``admin``; every action is one of the
library's guarded operations, so a click can never overwrite a worker's lease.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import escape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from beanie_tasks import admin, clock, store
from beanie_tasks.discovery import discover
from beanie_tasks.errors import TaskError
from beanie_tasks.states import PRIORITY_RANGE, State, state_value
from beanie_tasks.task import Task
from beanie_tasks.wakeup import Wakeup
from beanie_tasks.web import views
from beanie_tasks.web.security import CSRF_COOKIE, CSRF_FIELD, CSRF_HEADER, AuthHook, Csrf, Redactor, allowed, redacted

STATIC = os.path.join(os.path.dirname(__file__), "static")
BULK_LIMIT = 1000
# The event stream: a refresh every POLL_SECONDS without a change stream; with one, a refresh per
# change (a burst within COALESCE_SECONDS is one), and one after QUIET_SECONDS without any.
POLL_SECONDS = 2.0
QUIET_SECONDS = 30.0
COALESCE_SECONDS = 0.5
ACTIONS = ("cancel", "requeue", "delete", "run-now", "priority")


@dataclass
class Dashboard:
    """Everything the routes need: the classes, the safety settings and the templates."""

    classes: dict[str, type[Task]]
    read_only: bool
    auth: AuthHook | None
    redactors: dict[str, Redactor]
    csrf: Csrf
    title: str
    live: bool
    templates: Environment

    @property
    def by_collection(self) -> dict[str, type[Task]]:
        found: dict[str, type[Task]] = {}
        for cls in self.classes.values():
            found.setdefault(cls.collection().name, cls)
        return found

    def task_class(self, name: str) -> type[Task]:
        found = self.classes.get(name)
        if found is None:
            raise views.BadRequest(f"unknown task class {name!r}; known: {', '.join(sorted(self.classes))}")
        return found

    def redactor(self, task_class: type[Task]) -> Redactor | None:
        hook = self.redactors.get(task_class.__name__)
        if hook is not None:
            return hook
        declared = getattr(task_class, "dashboard_redact", None)
        return declared if callable(declared) else None

    def render(self, request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        token = self.csrf.token_for(request)
        page = self.templates.get_template(template).render(
            request=request,
            base=request.scope.get("root_path", "").rstrip("/"),
            title=self.title,
            read_only=self.read_only,
            live=self.live,
            csrf_token=token,
            csrf_field=CSRF_FIELD,
            classes=list(self.classes.values()),
            states=[s.value for s in State],
            priority_range=PRIORITY_RANGE,
            sorts=list(store.LIST_SORTS),
            **context,
        )
        response = HTMLResponse(page, status_code=status_code)
        if request.cookies.get(CSRF_COOKIE) != token:
            response.set_cookie(CSRF_COOKIE, token, httponly=False, samesite="strict", path="/")
        return response


def age(seconds: float | None) -> str:
    return "-" if seconds is None else clock.short_age(seconds)


def when(value: Any) -> str:
    if isinstance(value, datetime):
        return clock.as_utc(value).strftime("%Y-%m-%d %H:%M:%S UTC")
    return "-" if value is None else str(value)


def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("beanie_tasks.web", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        enable_async=False,
    )
    env.filters["age"] = age
    env.filters["when"] = when
    env.filters["text"] = views.as_text
    env.filters["short"] = lambda value: "" if value is None else views.as_text(value)[:120]
    env.filters["show"] = lambda value: when(value) if isinstance(value, datetime) else views.as_text(value)
    env.filters["state"] = state_value
    return env


def dashboard(
    task_classes: Sequence[type[Task] | str],
    *,
    read_only: bool = False,
    auth: AuthHook | None = None,
    redact: Mapping[type[Task] | str, Redactor] | None = None,
    secret: str | bytes | None = None,
    title: str = "beanie-tasks",
    live: bool = True,
) -> Starlette:
    """The dashboard of ``task_classes`` (classes, or module names holding them) as an ASGI app.

    ``auth(request)`` (sync or async) returns whether to serve the request; ``read_only``
    hides and refuses every action; ``redact`` maps a class (or its name) to a function that
    returns the document to show (a class can define ``dashboard_redact(document)`` instead);
    ``secret`` signs the CSRF tokens (default: random per process, so several dashboard
    processes behind one address need the same secret).
    """
    classes: list[type[Task]] = []
    names = [entry for entry in task_classes if isinstance(entry, str)]
    classes.extend(discover(names) if names else [])
    classes.extend(entry for entry in task_classes if not isinstance(entry, str))
    if not classes:
        raise ValueError("the dashboard needs at least one task class")
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"the dashboard shows Task subclasses, got {cls!r}")
    key = secret.encode() if isinstance(secret, str) else secret
    board = Dashboard(
        classes={cls.__name__: cls for cls in dict.fromkeys(classes)},
        read_only=read_only,
        auth=auth,
        redactors={(k if isinstance(k, str) else k.__name__): v for k, v in (redact or {}).items()},
        csrf=Csrf(key or secrets.token_bytes(32)),
        title=title,
        live=live,
        templates=environment(),
    )
    routes: list[Route | Mount] = [
        Route("/", guarded(board, overview_page)),
        Route("/partials/overview", guarded(board, overview_partial)),
        Route("/events", guarded(board, events)),
        Route("/schedules", guarded(board, schedules_page)),
        Route("/tasks/{cls}", guarded(board, tasks_page)),
        Route("/tasks/{cls}/bulk/{action}", guarded(board, bulk_action), methods=["POST"]),
        Route("/tasks/{cls}/{task_id}", guarded(board, task_page)),
        Route("/tasks/{cls}/{task_id}/{action}", guarded(board, task_action), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    if importlib.util.find_spec("prometheus_client") is not None:
        import prometheus_client

        routes.append(Mount("/metrics", asgi_guarded(board, prometheus_client.make_asgi_app())))
    return Starlette(routes=routes)


Handler = Callable[[Dashboard, Request], Awaitable[Response]]


def guarded(board: Dashboard, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """The route: the auth hook first, then the handler; a bad parameter is a one-line 400 page."""

    async def endpoint(request: Request) -> Response:
        if not await allowed(board.auth, request):
            return HTMLResponse("forbidden: the dashboard's auth hook refused this request", status_code=403)
        try:
            return await handler(board, request)
        except views.BadRequest as exc:
            return board.render(request, "error.html", status_code=400, message=str(exc))

    return endpoint


def asgi_guarded(board: Dashboard, inner: ASGIApp) -> ASGIApp:
    """A mounted ASGI app (the metrics) behind the same auth hook as the pages."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not await allowed(board.auth, Request(scope, receive)):
            refusal = HTMLResponse("forbidden: the dashboard's auth hook refused this request", status_code=403)
            await refusal(scope, receive, send)
            return
        await inner(scope, receive, send)

    return app


# ------------------------------------------------------------------ pages


async def overview_page(board: Dashboard, request: Request) -> Response:
    data = await views.overview(list(board.classes.values()))
    return board.render(request, "overview.html", page="overview", **data)


async def overview_partial(board: Dashboard, request: Request) -> Response:
    data = await views.overview(list(board.classes.values()))
    return board.render(request, "_overview.html", **data)


async def tasks_page(board: Dashboard, request: Request) -> Response:
    task_class = board.task_class(request.path_params["cls"])
    query = views.ListQuery.parse(request.query_params)
    page = await views.task_page(task_class, query)
    hook = board.redactor(task_class)
    rows = [redacted(row, hook) for row in page.rows]
    # A next page fetched by htmx is only rows, appended; while any is shown, live refreshes leave the list alone.
    appended = bool(request.headers.get("hx-request") and request.query_params.get("after"))
    return board.render(
        request,
        "_rows.html" if appended else "tasks.html",
        page="tasks",
        task_class=task_class,
        rows=rows,
        next_after=page.next_after,
        query=query,
        appended=appended,
    )


async def task_page(board: Dashboard, request: Request) -> Response:
    task_class = board.task_class(request.path_params["cls"])
    task_id = views.parse_id(request.path_params["task_id"])
    document = await task_class.task_store().find_in_scope(task_id)
    if document is None:
        return board.render(
            request, "error.html", status_code=404, message=f"no {task_class.__name__} with id {task_id}"
        )
    nodes = await views.graph(task_class, document, board.by_collection)
    shown = redacted(document, board.redactor(task_class))
    payload, fields = views.split_fields(task_class, shown)
    return board.render(
        request,
        "task.html",
        page="tasks",
        task_class=task_class,
        task=shown,
        payload=payload,
        fields=fields,
        nodes=nodes,
        state=state_value(document.get("state")),
    )


async def schedules_page(board: Dashboard, request: Request) -> Response:
    rows = await views.schedules(list(board.classes.values()))
    return board.render(request, "schedules.html", page="schedules", rows=rows)


# ------------------------------------------------------------------ actions


async def checked_form(board: Dashboard, request: Request) -> tuple[Mapping[str, Any] | None, Response | None]:
    """The action's form, or the refusal: read-only mode, then a missing or wrong CSRF token."""
    if board.read_only:
        return None, HTMLResponse("refused: the dashboard is read-only", status_code=403)
    form = await request.form()
    sent = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
    if not board.csrf.check(request, sent if isinstance(sent, str) else None):
        return None, HTMLResponse("refused: missing or invalid CSRF token; reload the page", status_code=403)
    return form, None


async def apply(task_store: store.Store, action: str, task_id: Any, form: Mapping[str, Any]) -> bool:
    """One guarded action on one task; False when its guard did not match (the task moved on)."""
    if action == "cancel":
        return await admin.cancel_task(task_store, task_id)
    if action == "requeue":
        return await admin.requeue_task(task_store, task_id)
    if action == "delete":
        return await admin.delete_task(task_store, task_id)
    if action == "run-now":
        return await admin.run_now(task_store, task_id)
    if action == "priority":
        raw = str(form.get("priority", ""))
        try:
            priority = int(raw)
        except ValueError:
            raise views.BadRequest(f"priority must be a whole number, got {raw!r}") from None
        try:
            return await admin.change_priority(task_store, task_id, priority)
        except ValueError as exc:
            raise views.BadRequest(str(exc)) from None
    raise views.BadRequest(f"unknown action {action!r}; use {', '.join(ACTIONS)}")


def done(request: Request, board: Dashboard, message: str, back: str, status_code: int = 200) -> Response:
    """After an action: htmx gets the message (and refreshes); a plain form post goes back to the page."""
    if request.headers.get("hx-request"):
        response = HTMLResponse(f'<span class="flash">{escape(message)}</span>', status_code=status_code)
        response.headers["HX-Trigger"] = "bt-refresh"
        return response
    return RedirectResponse(f"{back}?flash={message}", status_code=303)


async def task_action(board: Dashboard, request: Request) -> Response:
    task_class = board.task_class(request.path_params["cls"])
    task_id = views.parse_id(request.path_params["task_id"])
    action = request.path_params["action"]
    form, refusal = await checked_form(board, request)
    if refusal is not None:
        return refusal
    assert form is not None
    try:
        changed = await apply(task_class.task_store(), action, task_id, form)
    except TaskError as exc:
        raise views.BadRequest(str(exc)) from None
    base = request.scope.get("root_path", "").rstrip("/")
    back = (
        f"{base}/tasks/{task_class.__name__}/{task_id}"
        if action != "delete" or not changed
        else f"{base}/tasks/{task_class.__name__}"
    )
    if changed:
        return done(request, board, f"{action}: done", back)
    current = await task_class.task_store().find_in_scope(task_id, {"state": 1})
    now = state_value(current.get("state")) if current else "deleted"
    return done(request, board, f"{action}: not applied, the task is {now}", back, status_code=409)


async def bulk_action(board: Dashboard, request: Request) -> Response:
    task_class = board.task_class(request.path_params["cls"])
    action = request.path_params["action"]
    form, refusal = await checked_form(board, request)
    if refusal is not None:
        return refusal
    assert form is not None
    query = views.ListQuery.parse({k: str(v) for k, v in form.items() if k != "after"})
    ids = await views.selected_ids(task_class, query, BULK_LIMIT)
    task_store = task_class.task_store()
    changed = 0
    for task_id in ids:
        changed += await apply(task_store, action, task_id, form)
    base = request.scope.get("root_path", "").rstrip("/")
    message = f"{action}: {changed} of {len(ids)} selected task(s) changed"
    return done(request, board, message, f"{base}/tasks/{task_class.__name__}")


# ------------------------------------------------------------------ live updates


async def events(board: Dashboard, request: Request) -> Response:
    """Server-sent ``refresh`` events: on each change where a change stream is open, else every few seconds."""
    collections = {cls.collection().name: cls.collection() for cls in board.classes.values()}
    wakeups = [
        Wakeup(c, pipeline=store.ANY_CHANGES, min_poll=POLL_SECONDS, max_poll=POLL_SECONDS, idle_timeout=QUIET_SECONDS)
        for c in collections.values()
    ]

    async def stream() -> AsyncIterator[str]:
        try:
            for wakeup in wakeups:
                await wakeup.start()
            mode = "stream" if any(w.streaming for w in wakeups) else "poll"
            yield f"event: hello\ndata: {mode}\n\n"
            # Motor opens a stream's cursor lazily: a change made while it opens is covered by an early refresh.
            quiet = POLL_SECONDS
            while not await request.is_disconnected():
                waiters = [asyncio.ensure_future(w.wait()) for w in wakeups]
                try:
                    await asyncio.wait(waiters, timeout=quiet, return_when=asyncio.FIRST_COMPLETED)
                    quiet = QUIET_SECONDS
                finally:
                    for waiter in waiters:
                        waiter.cancel()
                    await asyncio.gather(*waiters, return_exceptions=True)
                yield "event: refresh\ndata: changed\n\n"
                await asyncio.sleep(COALESCE_SECONDS)  # a burst of changes is one refresh
        finally:
            for wakeup in wakeups:
                await wakeup.close()

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
