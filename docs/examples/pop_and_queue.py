"""Popping by hand, and consuming with queue() until a stop event is set."""

import asyncio

from beanie import init_beanie
from pymongo import AsyncMongoClient

from beanie_tasks import Priority, Task
from beanie_tasks.embedded import server_uri


class Thumbnail(Task):
    name: str


async def consume(stop: asyncio.Event, done: asyncio.Queue[str]) -> None:
    async for task in Thumbnail.queue(stop=stop):  # waits quietly while idle
        await task.finish()
        await done.put(task.name)


async def main(uri: str) -> None:
    client = AsyncMongoClient(uri, tz_aware=True)
    await client.drop_database("example_pop")
    await init_beanie(database=client.example_pop, document_models=[Thumbnail])

    for name, priority in [("a", Priority.MEDIUM), ("b", Priority.LOW), ("c", Priority.HIGH), ("d", Priority.MEDIUM)]:
        await Thumbnail(name=name, priority=priority).push()

    task = await Thumbnail.pop(consumer_id="by-hand")
    assert task is not None and task.name == "c"  # HIGH first
    print(f"popped {task.name}: {task.state.value}, lease until {task.lease_expires_at:%H:%M:%S}")
    await task.finish()

    stop = asyncio.Event()
    done: asyncio.Queue[str] = asyncio.Queue()
    consumer = asyncio.create_task(consume(stop, done))
    seen = [await done.get() for _ in range(3)]
    await Thumbnail(name="e").push()  # picked up well under a second
    seen.append(await done.get())
    stop.set()
    await consumer
    print("queue order:", seen)
    assert seen == ["a", "d", "b", "e"]  # MEDIUM in FIFO order, then LOW, then the late push

    await Thumbnail(name="f").push()
    async for task in Thumbnail.queue():
        await task.finish()
        break  # break also ends the queue
    await client.drop_database("example_pop")
    await client.close()


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
