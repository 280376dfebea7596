"""A FastAPI app whose endpoints push tasks and read their progress and results.

Deploy it one of two ways: with the worker inside the app's lifespan (``WORKER_IN_APP=1``,
one process), or with the worker apart (``beanie-tasks worker fastapi_app``) so the web
processes and the worker processes scale and restart independently.

    uvicorn fastapi_app:app                      # MONGODB_URI, MONGODB_DATABASE, WORKER_IN_APP
    beanie-tasks worker fastapi_app              # the separate worker, from the same module

Run as a program, it drives the app through httpx both ways and exits 0.
"""

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from beanie import PydanticObjectId, init_beanie
from fastapi import FastAPI, HTTPException

from beanie_tasks import State, Task, TaskFailed, WaitTimeout, Worker
from beanie_tasks.driver import client_for, close_client


class Thumbnail(Task):
    image: str
    width: int

    async def run(self) -> dict[str, Any]:
        for step, what in enumerate(("decoding", "resizing", "encoding"), start=1):
            await self.set_progress(step / 3, what)  # readable by the app while it runs
            await asyncio.sleep(0.05)  # stands in for real image work
        return {"url": f"/thumbs/{self.width}/{self.image}", "width": self.width}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    client = client_for(os.environ.get("MONGODB_URI", "mongodb://localhost:27017"))
    await init_beanie(database=client[os.environ.get("MONGODB_DATABASE", "app")], document_models=[Thumbnail])
    try:
        if os.environ.get("WORKER_IN_APP") == "1":
            # Runs beside the app; on shutdown running tasks get grace_period, the rest are released.
            async with Worker([Thumbnail], concurrency=4, grace_period=20).in_background():
                yield
        else:
            yield  # a separate `beanie-tasks worker fastapi_app` process runs the tasks
    finally:
        await close_client(client)


app = FastAPI(lifespan=lifespan)


@app.post("/thumbnails", status_code=202)
async def make_thumbnail(image: str, width: int = 128) -> dict[str, str]:
    task = await Thumbnail(image=image, width=width).push()
    return {"id": str(task.id)}


@app.get("/thumbnails/{task_id}")
async def thumbnail_status(task_id: PydanticObjectId) -> dict[str, Any]:
    task = await Thumbnail.get(task_id)
    if task is None:
        raise HTTPException(404, f"no thumbnail task {task_id}")
    return {
        "state": task.state.value,
        "progress": task.progress,
        "message": task.progress_message,
        "result": task.result,
        "error": task.error,
    }


@app.get("/thumbnails/{task_id}/result")
async def thumbnail_result(task_id: PydanticObjectId, timeout: float = 10.0) -> dict[str, Any]:
    """Wait (briefly) for the result: 200 with it, 202 if it is not ready yet, 500 if the task failed."""
    task = await Thumbnail.get(task_id)
    if task is None:
        raise HTTPException(404, f"no thumbnail task {task_id}")
    try:
        done = await task.wait(timeout=timeout)
    except WaitTimeout:
        raise HTTPException(202, "not ready yet; ask again") from None
    except TaskFailed as exc:
        raise HTTPException(500, f"the thumbnail failed: {exc}") from None
    result: dict[str, Any] = done.result
    return result


# ----------------------------------------------------------------------------- the demonstration


async def use_the_api() -> None:
    """Push through the API, watch the progress, then read the result."""
    import httpx
    from asgi_lifespan import LifespanManager

    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            task_id = (await http.post("/thumbnails", params={"image": "cat.png", "width": 64})).json()["id"]
            seen = set()
            while (status := (await http.get(f"/thumbnails/{task_id}")).json())["state"] != State.FINISHED.value:
                seen.add((status["state"], status["message"]))
                await asyncio.sleep(0.02)
            result = (await http.get(f"/thumbnails/{task_id}/result")).json()
    print(f"  seen while it ran: {sorted(seen, key=str)}")
    print(f"  result: {result}")
    assert result == {"url": "/thumbs/64/cat.png", "width": 64}


async def main(uri: str) -> None:
    database = f"example_fastapi_{uuid.uuid4().hex[:8]}"
    os.environ.update(MONGODB_URI=uri, MONGODB_DATABASE=database)
    try:
        print("worker inside the app's lifespan:")
        os.environ["WORKER_IN_APP"] = "1"
        await use_the_api()

        print("worker in a separate process:")
        os.environ["WORKER_IN_APP"] = "0"
        here = Path(__file__).resolve().parent
        worker = subprocess.Popen(
            [sys.executable, "-m", "beanie_tasks.cli", "worker", "fastapi_app", "--log-level", "WARNING"],
            cwd=here,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")]))},
        )
        try:
            await use_the_api()
        finally:
            worker.send_signal(signal.SIGTERM)  # drains: running tasks get the grace period
            assert worker.wait(timeout=60) == 0
    finally:
        client = client_for(uri)
        await client.drop_database(database)
        await close_client(client)


if __name__ == "__main__":
    from beanie_tasks.embedded import server_uri

    with server_uri() as server:
        asyncio.run(main(server))
