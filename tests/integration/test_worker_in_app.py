"""``Worker.in_background()`` inside a FastAPI lifespan: endpoints push, the in-app worker runs, endpoints read.

Driven through httpx's ASGITransport with asgi-lifespan, so the app's startup and
shutdown run exactly as a server would run them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import httpx
import pytest
from asgi_lifespan import LifespanManager
from beanie import PydanticObjectId
from fastapi import FastAPI, HTTPException

from beanie_tasks import State, Task, Worker
from beanie_tasks.errors import NotRegistered
from beanie_tasks.testing import eventually


class Thumbnail(Task):
    width: int

    async def run(self) -> dict[str, int]:
        await self.set_progress(0.5, "resizing")
        return {"width": self.width, "height": self.width // 2}


class Gated(Task):
    """Runs until the test opens its gate."""

    gate: ClassVar[asyncio.Event | None] = None

    async def run(self) -> str:
        assert Gated.gate is not None
        await self.set_progress(0.1, "waiting at the gate")
        await Gated.gate.wait()
        return "through"


class NeverInitialised(Task):
    async def run(self) -> None:
        return None


@pytest.fixture(autouse=True)
async def models(init_tasks: Callable[..., Awaitable[None]]) -> None:
    Gated.gate = asyncio.Event()
    await init_tasks(Thumbnail, Gated)


def make_app(worker: Worker) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with worker.in_background():
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/thumbnails", status_code=202)
    async def make_thumbnail(width: int) -> dict[str, str]:
        task = await Thumbnail(width=width).push()
        return {"id": str(task.id)}

    @app.post("/gated", status_code=202)
    async def push_gated() -> dict[str, str]:
        return {"id": str((await Gated().push()).id)}

    @app.get("/thumbnails/{task_id}")
    async def read_thumbnail(task_id: PydanticObjectId) -> dict[str, Any]:
        return describe(await Thumbnail.get(task_id))

    @app.get("/gated/{task_id}")
    async def read_gated(task_id: PydanticObjectId) -> dict[str, Any]:
        return describe(await Gated.get(task_id))

    return app


def describe(task: Task | None) -> dict[str, Any]:
    if task is None:
        raise HTTPException(404, "no such task")
    return {"state": task.state.value, "progress": task.progress, "result": task.result}


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


async def state_of(client: httpx.AsyncClient, path: str) -> dict[str, Any]:
    response = await client.get(path)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


async def test_an_endpoint_pushes_and_the_app_worker_runs_it() -> None:
    async with serving(make_app(Worker([Thumbnail, Gated]))) as client:
        response = await client.post("/thumbnails", params={"width": 640})
        assert response.status_code == 202
        task_id = response.json()["id"]

        async def finished() -> dict[str, Any] | None:
            body = await state_of(client, f"/thumbnails/{task_id}")
            return body if body["state"] == State.FINISHED.value else None

        body = await eventually(finished, timeout=30)
    assert body == {"state": "FINISHED", "progress": 0.5, "result": {"width": 640, "height": 320}}


async def test_shutdown_lets_a_running_task_finish_within_the_grace_period() -> None:
    worker = Worker([Thumbnail, Gated], grace_period=30)
    async with serving(make_app(worker)) as client:
        task_id = (await client.post("/gated")).json()["id"]

        async def running() -> bool:
            return (await state_of(client, f"/gated/{task_id}"))["state"] == State.RUNNING.value

        await eventually(running, timeout=30)
        assert Gated.gate is not None
        asyncio.get_running_loop().call_later(0.2, Gated.gate.set)  # opens while the app shuts down
    assert worker.running == 0
    stored = await Gated.get(PydanticObjectId(task_id))
    assert stored is not None and stored.state is State.FINISHED and stored.result == "through"


async def test_shutdown_releases_a_task_still_running_after_the_grace_period() -> None:
    worker = Worker([Thumbnail, Gated], grace_period=0.2)
    async with serving(make_app(worker)) as client:
        task_id = (await client.post("/gated")).json()["id"]

        async def running() -> bool:
            return (await state_of(client, f"/gated/{task_id}"))["state"] == State.RUNNING.value

        await eventually(running, timeout=30)
    stored = await Gated.get(PydanticObjectId(task_id))
    assert stored is not None and stored.state is State.CREATED and stored.attempts == 0 and stored.lease_token is None


async def test_a_worker_that_cannot_start_raises_when_the_block_ends(caplog: pytest.LogCaptureFixture) -> None:
    worker = Worker([NeverInitialised])
    with pytest.raises(NotRegistered):
        async with worker.in_background():
            await asyncio.sleep(0.05)
    assert "stopped with an error" in caplog.text
