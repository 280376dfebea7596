"""Dedupe keys: at most one task per key in flight; a duplicate push returns that task."""

import asyncio

from beanie import init_beanie
from pymongo import AsyncMongoClient

from beanie_tasks import Task
from beanie_tasks.embedded import server_uri


class RebuildIndex(Task):
    shop: str


async def main(uri: str) -> None:
    client = AsyncMongoClient(uri, tz_aware=True)
    await client.drop_database("example_dedupe")
    await init_beanie(database=client.example_dedupe, document_models=[RebuildIndex])

    first = await RebuildIndex(shop="s1", dedupe_key="rebuild:s1").push()
    request = RebuildIndex(shop="s1", dedupe_key="rebuild:s1")
    again = await request.push()
    if again is not request:  # the key was taken: push() returned the task already in flight
        print(f"duplicate: reusing {again.id} ({again.state.value})")
    assert again.id == first.id and request.id is None
    assert await RebuildIndex.find_all().count() == 1

    task = await RebuildIndex.pop()
    assert task is not None
    await task.finish()  # the key is free again once the task ended

    fresh = await RebuildIndex(shop="s1", dedupe_key="rebuild:s1").push()
    assert fresh.id != first.id
    print(f"after it finished, the same key queued a new task: {fresh.id}")
    await client.drop_database("example_dedupe")
    await client.close()


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
