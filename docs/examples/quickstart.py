"""Quick start: define a task, push it, pop it, finish it."""

import asyncio

from beanie import init_beanie
from pymongo import AsyncMongoClient

from beanie_tasks import Priority, State, Task
from beanie_tasks.embedded import server_uri


class SendEmail(Task):
    to: str
    subject: str


async def main(uri: str) -> None:
    client = AsyncMongoClient(uri, tz_aware=True)
    await client.drop_database("example_quickstart")
    await init_beanie(database=client.example_quickstart, document_models=[SendEmail])

    await SendEmail(to="ada@example.com", subject="hi", priority=Priority.HIGH).push()

    task = await SendEmail.pop()  # RUNNING, leased to this consumer
    assert task is not None and task.state is State.RUNNING
    print(f"sending {task.subject!r} to {task.to}")
    await task.finish(result={"sent": True})

    stored = await SendEmail.get(task.id)
    assert stored is not None and stored.state is State.FINISHED and stored.result == {"sent": True}
    await client.drop_database("example_quickstart")
    await client.close()


if __name__ == "__main__":
    with server_uri() as uri:  # MONGODB_URI, or a throw-away embedded server
        asyncio.run(main(uri))
