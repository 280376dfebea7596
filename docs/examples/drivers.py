"""The same tasks on either driver stack: Beanie 2 + PyMongo async, or Beanie 1 + Motor."""

import asyncio

import beanie
from beanie import init_beanie

from beanie_tasks import Task
from beanie_tasks.embedded import server_uri


class Greet(Task):
    name: str


def make_client(uri: str):  # type: ignore[no-untyped-def]
    if int(beanie.__version__.split(".")[0]) >= 2:
        from pymongo import AsyncMongoClient

        return AsyncMongoClient(uri, tz_aware=True)
    from motor.motor_asyncio import AsyncIOMotorClient  # Beanie 1.x: pip install 'beanie-tasks[motor]'

    return AsyncIOMotorClient(uri, tz_aware=True)


async def main(uri: str) -> None:
    client = make_client(uri)
    await client.drop_database("example_drivers")
    await init_beanie(database=client.example_drivers, document_models=[Greet])  # the only setup step

    await Greet(name="world").push()
    task = await Greet.pop()
    assert task is not None
    await task.finish(result=f"hello, {task.name}")
    print(f"beanie {beanie.__version__} with {type(client).__module__}.{type(client).__name__}: {task.result}")

    await client.drop_database("example_drivers")
    closing = client.close()
    if closing is not None:  # PyMongo's async client closes asynchronously; Motor's does not
        await closing


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
