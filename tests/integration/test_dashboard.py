"""The web dashboard through httpx's ASGI transport: pages, keyset pages, guarded actions, CSRF, auth, escaping."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from beanie import Link

from beanie_tasks import DependencyType, State, Task, depends_on

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from beanie_tasks.web import dashboard, views  # noqa: E402


class Mail(Task):
    to: str = ""
    body: str = ""
    smtp_password: str = ""
    api: dict[str, Any] = {}


class Digest(Task):
    mail: Link[Mail] = depends_on(DependencyType.DIRECT)

    @classmethod
    def dashboard_redact(cls, document: dict[str, Any]) -> dict[str, Any]:
        return document | {"note": "hidden by the class"}


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Mail, Digest)


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dash")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(dashboard([Mail, Digest])) as http:
        yield http


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, "the page carries no CSRF token"
    return found.group(1)


async def test_overview_lists_classes_counts_and_backlog(client: httpx.AsyncClient) -> None:
    for n in range(3):
        await Mail(to=f"user{n}@example.com").push()
    page = await client.get("/")
    assert page.status_code == 200, page.text
    assert 'data-class="Mail"' in page.text and 'data-class="Digest"' in page.text
    assert re.search(r'class="backlog">3<', page.text)
    assert "htmx.min.js" in page.text
    assert (await client.get("/static/htmx.min.js")).status_code == 200


async def test_list_filters_by_state_priority_key_and_searches(client: httpx.AsyncClient) -> None:
    failed = await Mail(to="c", priority=9).push()
    claimed = await Mail.pop()
    assert claimed is not None and claimed.id == failed.id
    await claimed.fail("SMTP said: mailbox unavailable")
    keep = await Mail(to="a", priority=7, dedupe_key="k-1").push()
    await Mail(to="b", priority=2).push()
    by_priority = await client.get("/tasks/Mail", params={"priority": "7"})
    assert str(keep.id) in by_priority.text and str(failed.id) not in by_priority.text
    by_key = await client.get("/tasks/Mail", params={"dedupe_key": "k-1"})
    assert str(keep.id) in by_key.text
    by_error = await client.get("/tasks/Mail", params={"q": "MAILBOX"})
    assert str(failed.id) in by_error.text and str(keep.id) not in by_error.text
    by_id = await client.get("/tasks/Mail", params={"q": str(keep.id)})
    assert by_id.text.count('data-id="') == 1
    by_state = await client.get("/tasks/Mail", params={"state": "FAILED", "sort": "ended"})
    assert by_state.text.count('data-id="') == 1


async def test_overview_charts_finished_and_failed_per_minute(client: httpx.AsyncClient) -> None:
    for n in range(3):
        await Mail(to=str(n)).push()
    for outcome in ("finish", "finish", "fail"):
        task = await Mail.pop()
        assert task is not None
        await (task.finish() if outcome == "finish" else task.fail("no"))
    page = await client.get("/")
    assert "<title>2 finished</title>" in page.text and "<title>1 failed</title>" in page.text


async def test_bad_parameters_are_one_line_errors(client: httpx.AsyncClient) -> None:
    for path, params in [
        ("/tasks/Mail", {"state": "LOST"}),
        ("/tasks/Mail", {"priority": "high"}),
        ("/tasks/Mail", {"sort": "queue"}),
        ("/tasks/Mail", {"after": "not-a-cursor"}),
        ("/tasks/Nope", {}),
        ("/tasks/Mail/123", {}),
    ]:
        page = await client.get(path, params=params)
        assert page.status_code == 400, (path, params, page.status_code)
        assert re.search(r'<p class="error">[^<\n]+</p>', page.text)
    missing = await client.get("/tasks/Mail/65f000000000000000000000")
    assert missing.status_code == 404


async def test_keyset_pages_cover_every_task_once(client: httpx.AsyncClient) -> None:
    pushed = [await Mail(to=str(n), priority=n % 3).push() for n in range(7)]
    every = {str(task.id) for task in pushed}
    ones = {str(task.id) for task in pushed if task.priority == 1}
    for sort, state, priority, ids in (
        ("newest", None, None, every),
        ("queue", "CREATED", None, every),
        ("queue", "CREATED", "1", ones),  # the filter's priority and the order's cannot widen each other
        ("newest", None, "1", ones),
    ):
        seen: list[str] = []
        params = {"sort": sort} | ({"state": state} if state else {}) | ({"priority": priority} if priority else {})
        after = None
        for _ in range(10):
            query = views.ListQuery.parse(params | ({"after": after} if after else {}))
            page = await views.task_page(Mail, query, limit=2)
            seen.extend(str(row["_id"]) for row in page.rows)
            after = page.next_after
            if after is None:
                break
        assert sorted(seen) == sorted(ids), params
        assert len(seen) == len(ids)
    # the queue order is the claim's: highest priority first
    first = await client.get("/tasks/Mail", params={"sort": "queue", "state": "CREATED"})
    priorities = [int(p) for p in re.findall(r'<td class="priority">(\d+)</td>', first.text)]
    assert priorities == sorted(priorities, reverse=True)


async def test_stored_script_renders_as_text(client: httpx.AsyncClient) -> None:
    hostile = "<script>alert('x')</script>"
    task = await Mail(to=hostile, body=hostile).push()
    claimed = await Mail.pop()
    assert claimed is not None
    await claimed.fail(hostile)
    for path in ("/", f"/tasks/Mail/{task.id}", "/tasks/Mail", "/tasks/Mail?q=%3Cscript"):
        page = await client.get(path)
        assert "<script>alert" not in page.text, path
    detail = await client.get(f"/tasks/Mail/{task.id}")
    assert "&lt;script&gt;alert(" in detail.text


async def test_credentials_are_redacted(client: httpx.AsyncClient) -> None:
    task = await Mail(
        to="x", smtp_password="hunter2-secret", api={"api_key": "k-123456", "uri": "mongodb://bob:pw77@db/x"}
    ).push()
    page = await client.get(f"/tasks/Mail/{task.id}")
    assert page.status_code == 200
    for secret in ("hunter2-secret", "k-123456", "pw77"):
        assert secret not in page.text
    assert "***" in page.text


async def test_class_redaction_hook_and_graph(client: httpx.AsyncClient) -> None:
    mail = await Mail(to="x").push()
    digest = await Digest(mail=mail).push()
    up = await client.get(f"/tasks/Digest/{digest.id}")
    assert "hidden by the class" in up.text
    assert str(mail.id)[-10:] in up.text and "<svg" in up.text
    down = await client.get(f"/tasks/Mail/{mail.id}")
    assert str(digest.id)[-10:] in down.text  # the dependent still waits for it


async def actions_page(client: httpx.AsyncClient, task: Task) -> tuple[str, str]:
    page = await client.get(f"/tasks/{type(task).__name__}/{task.id}")
    return f"/tasks/{type(task).__name__}/{task.id}", csrf_of(page)


async def test_cancel_needs_the_csrf_token(client: httpx.AsyncClient) -> None:
    task = await Mail(to="x").push()
    url, token = await actions_page(client, task)
    refused = await client.post(f"{url}/cancel", data={})
    assert refused.status_code == 403 and "CSRF" in refused.text
    forged = await client.post(f"{url}/cancel", data={"csrf": "forged.value"})
    assert forged.status_code == 403
    fresh = client_for(dashboard([Mail]))  # no cookie: the token alone is not enough
    async with fresh:
        assert (await fresh.post(f"{url}/cancel", data={"csrf": token})).status_code == 403
    assert (await Mail.get(task.id)).state == State.CREATED  # type: ignore[union-attr]
    done = await client.post(f"{url}/cancel", data={"csrf": token}, headers={"HX-Request": "true"})
    assert done.status_code == 200, done.text
    assert (await Mail.get(task.id)).state == State.CANCELLED  # type: ignore[union-attr]
    again = await client.post(f"{url}/cancel", data={"csrf": token}, headers={"HX-Request": "true"})
    assert again.status_code == 409 and "CANCELLED" in again.text


async def test_actions_use_the_guarded_operations(client: httpx.AsyncClient) -> None:
    waiting = await Mail(to="w", priority=1).push()
    url, token = await actions_page(client, waiting)
    hx = {"HX-Request": "true"}
    assert (await client.post(f"{url}/priority", data={"csrf": token, "priority": "9"}, headers=hx)).status_code == 200
    assert (await Mail.get(waiting.id)).priority == 9  # type: ignore[union-attr]
    bad = await client.post(f"{url}/priority", data={"csrf": token, "priority": "1000"}, headers=hx)
    assert bad.status_code == 400
    # a running task keeps its lease: no requeue, no delete, no priority change
    running = await Mail.pop()
    assert running is not None and running.id == waiting.id
    for action in ("requeue", "delete", "run-now", "priority"):
        answer = await client.post(f"{url}/{action}", data={"csrf": token, "priority": "3"}, headers=hx)
        assert answer.status_code == 409, action
    stored = await Mail.get(waiting.id)
    assert stored is not None and stored.state == State.RUNNING and stored.lease_token == running.lease_token
    await running.fail("boom")
    assert (await client.post(f"{url}/requeue", data={"csrf": token}, headers=hx)).status_code == 200
    requeued = await Mail.get(waiting.id)
    assert requeued is not None and requeued.state == State.CREATED and requeued.attempts == 0
    assert requeued.error is None and requeued.last_error == "boom"  # as requeue-failed keeps it
    later = await Mail(to="later", run_at=requeued.created_at.replace(year=2100)).push()
    later_url, _ = await actions_page(client, later)
    assert (await client.post(f"{later_url}/run-now", data={"csrf": token}, headers=hx)).status_code == 200
    assert (await Mail.get(later.id)).run_at.year < 2100  # type: ignore[union-attr]
    assert await (await Mail.get(later.id)).cancel()  # type: ignore[union-attr]
    plain = await client.post(f"{later_url}/delete", data={"csrf": token})
    assert plain.status_code == 303
    assert await Mail.get(later.id) is None


async def test_bulk_action_on_a_filtered_selection(client: httpx.AsyncClient) -> None:
    for n in range(4):
        await Mail(to=str(n), priority=5 if n % 2 else 1).push()
    page = await client.get("/tasks/Mail")
    token = csrf_of(page)
    answer = await client.post(
        "/tasks/Mail/bulk/cancel", data={"csrf": token, "priority": "5"}, headers={"HX-Request": "true"}
    )
    assert answer.status_code == 200 and "2 of 2" in answer.text
    counts = await Mail.counts()
    assert counts[State.CANCELLED] == 2 and counts[State.CREATED] == 2


async def test_read_only_mode_hides_and_refuses_actions() -> None:
    task = await Mail(to="x").push()
    async with client_for(dashboard([Mail], read_only=True)) as http:
        page = await http.get(f"/tasks/Mail/{task.id}")
        assert page.status_code == 200 and "read-only" in page.text and "action-cancel" not in page.text
        token = re.search(r'"X-CSRF-Token": "([^"]+)"', page.text)
        assert token is not None
        refused = await http.post(f"/tasks/Mail/{task.id}/cancel", data={"csrf": token.group(1)})
        assert refused.status_code == 403 and "read-only" in refused.text
    assert (await Mail.get(task.id)).state == State.CREATED  # type: ignore[union-attr]


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_auth_hook_allows_or_refuses(asynchronous: bool) -> None:
    def sync_auth(request: Any) -> bool:
        return bool(request.headers.get("x-user") == "ops")

    async def async_auth(request: Any) -> bool:
        return sync_auth(request)

    app = dashboard([Mail], auth=async_auth if asynchronous else sync_auth)
    async with client_for(app) as http:
        assert (await http.get("/")).status_code == 403
        assert (await http.get("/tasks/Mail")).status_code == 403
        assert (await http.post("/tasks/Mail/bulk/cancel")).status_code == 403
        assert (await http.get("/", headers={"x-user": "ops"})).status_code == 200


async def test_mounted_under_a_prefix_in_another_app() -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    outer = Starlette(routes=[Mount("/ops/tasks", dashboard([Mail]))])
    task = await Mail(to="x").push()
    async with client_for(outer) as http:
        page = await http.get(f"/ops/tasks/tasks/Mail/{task.id}")
        assert page.status_code == 200
        assert 'href="/ops/tasks/static/dashboard.css"' in page.text
        assert f'action="/ops/tasks/tasks/Mail/{task.id}/cancel"' in page.text


async def test_schedules_page(client: httpx.AsyncClient) -> None:
    page = await client.get("/schedules")
    assert page.status_code == 200 and "periodic" in page.text


async def test_metrics_are_mounted_when_prometheus_client_is_installed(client: httpx.AsyncClient) -> None:
    pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")
    answer = await client.get("/metrics/")
    assert answer.status_code == 200 and "# HELP" in answer.text
    async with client_for(dashboard([Mail], auth=lambda request: False)) as refused:
        assert (await refused.get("/metrics/")).status_code == 403


async def test_hostile_documents_do_not_break_any_page(client: httpx.AsyncClient) -> None:
    from bson import ObjectId

    collection = Mail.collection()
    hostile = [
        {"_id": ObjectId(), "state": ["CREATED"], "priority": "high", "run_at": "tomorrow", "error": {"x": [1]}},
        {"_id": ObjectId()},
        {"_id": ObjectId(), "state": "FAILED", "error": 42, "finished_at": "yesterday", "progress": "half", "to": None},
        {"_id": ObjectId(), "state": "RUNNING", "progress": 0.5, "consumer_id": {"$gt": ""}, "lease_expires_at": 3},
        {"_id": ObjectId(), "state": "FINISHED", "dependents_in": "Mail", "dependents_pending": "yes"},
        {"_id": ObjectId(), "state": "FINISHED", "dependents_in": ["$bad", "", 7, "Mail"]},
    ]
    await collection.insert_many(hostile)
    for path in ["/", "/tasks/Mail", "/tasks/Mail?state=FAILED&sort=ended", "/tasks/Mail?q=4"]:
        page = await client.get(path)
        assert page.status_code == 200, (path, page.text[-500:])
    for document in hostile:
        page = await client.get(f"/tasks/Mail/{document['_id']}")
        assert page.status_code == 200, (document, page.text[-500:])
