"""Testing a FastAPI endpoint that pushes a task, then running that task as the worker would.

The fixtures come from the beanie_tasks pytest plugin: nothing is imported for them.
Run it directly (it runs itself under pytest) or with ``pytest docs/examples/testing_fastapi.py``.
"""

import subprocess
import sys
from collections.abc import AsyncIterator
from importlib.metadata import entry_points

import httpx
import pytest
from fastapi_app import Thumbnail, app  # the app of docs/examples/fastapi_app.py

from beanie_tasks import State, Task
from beanie_tasks.testing import run_now

# One event loop for the whole session works as well as one per test.
pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
def task_models() -> list[type[Task]]:
    """The classes task_database initialises (or set `beanie_tasks_models = fastapi_app` in the pytest ini)."""
    return [Thumbnail]


@pytest.fixture
async def api(task_database: object) -> AsyncIterator[httpx.AsyncClient]:
    # No lifespan: the test owns the database (task_database) and runs tasks itself (run_now).
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
        yield client


async def test_the_endpoint_pushes_a_thumbnail(api: httpx.AsyncClient) -> None:
    response = await api.post("/thumbnails", params={"image": "cat.png", "width": 64})
    assert response.status_code == 202
    task = await Thumbnail.get(response.json()["id"])
    assert task is not None and task.state is State.CREATED and task.width == 64


async def test_the_result_is_served_once_the_task_ran(api: httpx.AsyncClient) -> None:
    task_id = (await api.post("/thumbnails", params={"image": "dog.png"})).json()["id"]
    assert (await api.get(f"/thumbnails/{task_id}")).json()["state"] == "CREATED"

    done = await run_now(await Thumbnail.get(task_id))  # claim, lease, heartbeats, progress, result
    assert done.state is State.FINISHED

    status = (await api.get(f"/thumbnails/{task_id}")).json()
    assert status["progress"] == 1.0 and status["message"] == "encoding"
    assert (await api.get(f"/thumbnails/{task_id}/result")).json() == {"url": "/thumbs/128/dog.png", "width": 128}


if __name__ == "__main__":
    # Installing beanie-tasks registers the plugin; from a source checkout, name it.
    installed = any(ep.name == "beanie_tasks" for ep in entry_points(group="pytest11"))
    plugin = [] if installed else ["-p", "beanie_tasks.pytest_plugin"]
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", *plugin]))
