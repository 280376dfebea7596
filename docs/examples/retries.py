"""Retries: opt in per class or per task; failures back off exponentially, then end FAILED."""

import asyncio
import contextlib
from datetime import timedelta

from beanie import init_beanie
from pymongo import AsyncMongoClient

from beanie_tasks import Backoff, State, Task
from beanie_tasks.embedded import server_uri
from beanie_tasks.task import utcnow


class Webhook(Task):
    url: str

    class TaskSettings:
        max_attempts = 3
        backoff = Backoff(base=0.2, factor=2, maximum=30, jitter=0.5)


class Notify(Task):
    """No TaskSettings: one attempt, unless a task asks for more."""

    user: str


async def next_due(task_class: type[Task]) -> Task:
    """Wait for the next due task: queue() sleeps until one is ready."""
    async with contextlib.aclosing(task_class.queue()) as tasks:
        async for task in tasks:
            return task
    raise RuntimeError("the queue ended")


async def main(uri: str) -> None:
    client = AsyncMongoClient(uri, tz_aware=True)
    await client.drop_database("example_retries")
    await init_beanie(database=client.example_retries, document_models=[Webhook, Notify])

    await Webhook(url="https://example.com/hook").push()
    for _ in range(3):
        task = await next_due(Webhook)
        await task.fail(ConnectionError("connection refused"))
        if task.state is State.CREATED and task.run_at is not None:
            print(f"attempt {task.attempts} failed; retry in {(task.run_at - utcnow()).total_seconds():.2f}s")
        else:
            print(f"attempt {task.attempts} failed; {task.state.value}: {task.error}")
    assert task.state is State.FAILED and task.attempts == 3

    await Notify(user="ada", max_attempts=2).push()  # per-task opt-in
    first = await next_due(Notify)
    await first.fail("mail server busy", retry_in=timedelta(seconds=0.1))
    assert first.state is State.CREATED
    second = await next_due(Notify)
    await second.fail(ValueError("no such user"), retry=False)  # not worth retrying
    assert second.state is State.FAILED
    print(f"notify: {second.state.value} after {second.attempts} attempts ({second.error})")

    await client.drop_database("example_retries")
    await client.close()


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
