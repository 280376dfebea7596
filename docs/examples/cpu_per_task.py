"""Client CPU per task, the way `bench/cpu.py` counts it: push() against a raw insert of the same document.

The server is another process, so `time.process_time()` counts only this client's
work: model validation, encoding, the driver. Rounds alternate which side goes first,
and the ratio of each round's pair is what compares, not the absolute figures.
"""

import asyncio
import gc
import statistics
import time
from typing import Any

from beanie import init_beanie
from bson import ObjectId
from pymongo import AsyncMongoClient

from beanie_tasks import Task
from beanie_tasks.embedded import server_uri

TASKS = 50
ROUNDS = 3


class Thumbnail(Task):
    image: str = "cat.png"


async def cpu_per_push(tasks: int) -> float:
    gc.collect()
    started = time.process_time()
    for _ in range(tasks):
        await Thumbnail().push()
    return (time.process_time() - started) / tasks * 1e6


async def cpu_per_raw_insert(collection: Any, stored: dict[str, Any], tasks: int) -> float:
    gc.collect()
    started = time.process_time()
    for _ in range(tasks):
        await collection.insert_one(stored | {"_id": ObjectId()})
    return (time.process_time() - started) / tasks * 1e6


async def main(uri: str) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True)
    await client.drop_database("example_cpu")
    await init_beanie(database=client.example_cpu, document_models=[Thumbnail])
    collection = client.example_cpu[Thumbnail.get_collection_name()]

    await Thumbnail().push()  # warm up: the connection, the first validation
    stored = await collection.find_one()  # the very document push() stores
    assert stored is not None

    ratios = []
    for round_ in range(ROUNDS):
        if round_ % 2 == 0:
            ours = await cpu_per_push(TASKS)
            raw = await cpu_per_raw_insert(collection, stored, TASKS)
        else:
            raw = await cpu_per_raw_insert(collection, stored, TASKS)
            ours = await cpu_per_push(TASKS)
        ratios.append(ours / raw)
        print(f"round {round_ + 1}: push() {ours:.0f} µs/task, raw insert {raw:.0f} µs/task, {ours / raw:.2f}x")
    print(f"median ratio over {ROUNDS} rounds: {statistics.median(ratios):.2f}x")
    assert await collection.count_documents({}) == 1 + 2 * ROUNDS * TASKS

    await client.drop_database("example_cpu")
    await client.close()


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
