"""push_sync / wait_sync: producers without an event loop, through PyMongo's sync client.

A sync producer talks to the server over its own client, so these tests need a wire
server (mongomock keeps one in-process store per client).
"""

from __future__ import annotations

import asyncio
import threading
import urllib.parse
from typing import Any

import pytest
from beanie import Link
from flask import Flask, jsonify, request

import beanie_tasks.sync
from beanie_tasks import (
    DependencyType,
    State,
    Task,
    TaskFailed,
    TransitionError,
    WaitTimeout,
    Worker,
    clock,
    depends_on,
)
from beanie_tasks import store as storage
from beanie_tasks.task import FAR_FUTURE
from beanie_tasks.testing import CommandCounter, running
from tests.conftest import Backend

pytestmark = pytest.mark.wire


class Square(Task):
    n: int

    def run(self) -> int:  # a plain def: the worker runs it in a thread
        if self.n < 0:
            raise ValueError("negative")
        return self.n * self.n


class Resize(Task):
    src: str

    async def run(self) -> str:
        return f"resized {self.src}"


class Publish(Task):
    resize: Link[Resize] = depends_on(DependencyType.DIRECT)

    async def run(self) -> str:
        return "published"


def with_database(uri: str, name: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
def counter() -> CommandCounter:
    return CommandCounter()


@pytest.fixture(autouse=True)
async def producer(init_tasks: Any, backend: Backend, db: Any, counter: CommandCounter) -> Any:
    """The async side (the test's worker) and the sync producer on the same database."""
    await init_tasks(Square, Resize, Publish)
    assert backend.uri is not None
    await asyncio.to_thread(
        beanie_tasks.sync.init,
        with_database(backend.uri, db.name),
        document_models=[Square, Resize, Publish],
        event_listeners=[counter],
    )
    counter.reset()
    yield
    beanie_tasks.sync.close()


async def test_push_sync_costs_one_command_and_stores_what_push_stores(counter: CommandCounter) -> None:
    synced = Square(n=3, dedupe_key="three").push_sync()
    assert counter.by_name() == {"insert": 1}
    assert synced.id is not None and synced.state is State.CREATED and synced.max_attempts
    pushed = await Square(n=4, dedupe_key="four").push()
    one = await Square.collection().find_one({"_id": pushed.id})
    other = await Square.collection().find_one({"_id": synced.id})
    assert one is not None and other is not None
    assert sorted(one) == sorted(other) and other["dedupe_slot"] == "three"
    for name in ("state", "attempts", "max_attempts", "priority", "dedupe_key"):
        assert type(one[name]) is type(other[name]), name


async def test_dedupe_returns_the_in_flight_task() -> None:
    first = await Square(n=1, dedupe_key="k").push()
    twin = Square(n=2, dedupe_key="k")
    returned = twin.push_sync()
    assert returned is not twin and twin.id is None and returned.id == first.id and returned.n == 1
    assert await Square.find_all().count() == 1


async def test_validation_and_scheduling_match_push() -> None:
    bad = Square(n=1)
    bad.n = "many"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="validation error"):
        bad.push_sync()
    with pytest.raises(ValueError, match="either delay or run_at"):
        Square(n=1).push_sync(delay=1, run_at=FAR_FUTURE)
    later = Square(n=1).push_sync(delay=3600)
    assert later.run_at is not None and await Square.pop() is None
    with pytest.raises(TransitionError, match="already pushed"):
        later.push_sync()
    assert await Square.find_all().count() == 1


async def test_links_park_until_the_dependency_finishes() -> None:
    resize = Resize(src="a.png").push_sync()
    publish = Publish(resize=resize).push_sync()  # type: ignore[arg-type]
    assert publish.run_at == FAR_FUTURE
    claimed = await Resize.pop()
    assert claimed is not None and claimed.id == resize.id
    await claimed.finish()
    released = await Publish.pop()
    assert released is not None and released.id == publish.id
    done = Resize(src="b.png").push_sync()
    claimed = await Resize.pop()
    assert claimed is not None
    await claimed.finish()
    ready = Publish(resize=done).push_sync()  # type: ignore[arg-type]
    assert ready.run_at != FAR_FUTURE


async def test_a_dependency_that_ended_before_registration_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    """The race push() handles: the dependency ends between the read and the registration."""
    resize = Resize(src="race.png").push_sync()
    claimed = await Resize.pop()
    assert claimed is not None
    store = storage.sync_of(Resize)
    original = type(store).states_of
    calls = 0

    def finish_after_first_read(self: Any, name: str, ids: Any) -> Any:
        nonlocal calls
        calls += 1
        found = original(self, name, ids)
        if calls == 1:  # the push's read saw it RUNNING; it finishes before the registration
            self.shape.collection_named(name).update_one(
                {"_id": resize.id}, {"$set": {"state": "FINISHED"}, "$unset": {"dedupe_slot": ""}}
            )
        return found

    monkeypatch.setattr(type(store), "states_of", finish_after_first_read)
    publish = Publish(resize=resize).push_sync()  # type: ignore[arg-type]
    assert publish.run_at != FAR_FUTURE, "released at once, not left to the repair sweep"
    assert await Publish.pop() is not None


async def test_pushes_from_plain_threads_are_run_by_the_worker() -> None:
    pushed: list[Square] = []
    lock = threading.Lock()

    def producer(start: int) -> None:
        for n in range(start, start + 3):
            task = Square(n=n).push_sync()
            with lock:
                pushed.append(task)

    threads = [threading.Thread(target=producer, args=(i * 10,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        await asyncio.to_thread(thread.join)
    assert len({t.id for t in pushed}) == 18
    async with running(Worker([Square], concurrency=4)):
        results = await asyncio.gather(*(asyncio.to_thread(t.wait_sync, 60) for t in pushed))
    assert sorted(r.result for r in results) == sorted(t.n * t.n for t in pushed)
    assert all(r.state is State.FINISHED for r in results)


async def test_wait_sync_raises_what_wait_raises() -> None:
    with pytest.raises(TransitionError, match="never pushed"):
        Square(n=1).wait_sync()
    failing = Square(n=-1).push_sync()
    with pytest.raises(WaitTimeout, match="still CREATED"):
        failing.wait_sync(timeout=0.2)
    async with running(Worker([Square])):
        with pytest.raises(TaskFailed, match="negative") as caught:
            await asyncio.to_thread(failing.wait_sync, 60)
    assert isinstance(caught.value.task, Square) and caught.value.task.state is State.FAILED


def flask_app() -> Flask:
    """What a Flask app does: push from a request handler, read the outcome from another."""
    app = Flask(__name__)

    @app.post("/squares")
    def create() -> Any:
        task = Square(n=int(request.get_json()["n"])).push_sync()
        return jsonify(id=str(task.id)), 202

    @app.get("/squares/<task_id>")
    def result(task_id: str) -> Any:
        from beanie import PydanticObjectId

        task = Square.model_construct(id=PydanticObjectId(task_id))
        return jsonify(result=task.wait_sync(timeout=60).result)

    return app


@pytest.fixture
def web() -> Any:
    return flask_app().test_client()  # no ``with``: its requests run on worker threads


async def test_a_flask_app_pushes_and_a_worker_runs_it(web: Any) -> None:
    created = await asyncio.to_thread(web.post, "/squares", json={"n": 12})
    assert created.status_code == 202
    task_id = created.get_json()["id"]
    async with running(Worker([Square])):
        answer = await asyncio.to_thread(web.get, f"/squares/{task_id}")
    assert answer.status_code == 200 and answer.get_json() == {"result": 144}


async def test_the_clock_offset_is_measured_again_once_it_is_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    sync_store = storage.sync_of(Square)
    assert not clock.is_stale(sync_store.shape.raw), "init measured it"
    measured: list[Any] = []
    monkeypatch.setattr(storage.SyncStore, "measure_clock", lambda self: measured.append(self))
    Square(n=1).push_sync()
    assert measured == []
    monkeypatch.setattr(clock, "RESYNC_EVERY", 0.0)
    Square(n=2).push_sync()
    assert measured == [sync_store]


async def test_wait_sync_is_woken_by_a_change_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    task = Square(n=5).push_sync()
    reads = 0
    original = storage.SyncStore.find_by_id

    def counted(self: storage.SyncStore, *args: Any) -> Any:
        nonlocal reads
        reads += 1
        return original(self, *args)

    monkeypatch.setattr(storage.SyncStore, "find_by_id", counted)

    async def finish_soon() -> None:
        await asyncio.sleep(1.0)
        claimed = await Square.pop()
        assert claimed is not None
        await claimed.finish(25)

    finisher = asyncio.create_task(finish_soon())
    # A long poll interval: polling would read the task some six times in the first second;
    # woken by the change stream, it reads it once, then once more after the finish.
    done = await asyncio.to_thread(task.wait_sync, 60, poll_interval=30)
    await finisher
    assert done.result == 25
    assert reads <= 3, f"{reads} reads: the waiter polled instead of watching"
