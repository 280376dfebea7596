"""Testing your own tasks with beanie_tasks.testing: a server, a fresh database, a command counter.

The fixtures (``mongodb_uri``, ``task_database``) come from the beanie_tasks pytest plugin, with no import.
Run it directly (it runs itself under pytest) or with ``pytest docs/examples/testing_fixtures.py``.
"""

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from beanie import init_beanie

from beanie_tasks import State, Task
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.testing import CommandCounter


class Welcome(Task):
    email: str


async def send_welcome(task: Welcome) -> None:
    """The code under test: what a consumer does with one task."""
    if "@" not in task.email:
        await task.fail(ValueError(f"not an address: {task.email}"), retry=False)
        return
    await task.finish(result={"sent_to": task.email})


@pytest.mark.asyncio
async def test_a_welcome_is_sent(task_database: object) -> None:
    await init_beanie(database=task_database, document_models=[Welcome])  # type: ignore[arg-type]
    await Welcome(email="ada@example.com").push()
    task = await Welcome.pop()
    assert task is not None
    await send_welcome(task)
    assert (await Welcome.counts())[State.FINISHED] == 1


@pytest.mark.asyncio
async def test_a_bad_address_is_dead_lettered(task_database: object) -> None:
    await init_beanie(database=task_database, document_models=[Welcome])  # type: ignore[arg-type]
    await Welcome(email="nobody").push()
    task = await Welcome.pop()
    assert task is not None
    await send_welcome(task)
    assert task.state is State.FAILED and "not an address" in (task.error or "")


@pytest.mark.asyncio
async def test_popping_costs_one_command(mongodb_uri: str) -> None:
    counter = CommandCounter()
    client = client_for(mongodb_uri, event_listeners=[counter])
    try:
        await init_beanie(database=client.example_counting, document_models=[Welcome])
        await Welcome(email="x@example.com").push()
        counter.reset()
        assert await Welcome.pop() is not None
        assert counter.by_name() == {"findAndModify": 1}
    finally:
        await client.drop_database("example_counting")
        await close_client(client)


if __name__ == "__main__":
    # Installing beanie-tasks registers the plugin; from a source checkout, name it.
    installed = any(ep.name == "beanie_tasks" for ep in entry_points(group="pytest11"))
    plugin = [] if installed else ["-p", "beanie_tasks.pytest_plugin"]
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", *plugin]))
