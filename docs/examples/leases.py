"""Leases: heartbeats and progress extend them; a consumer that lost its lease learns it."""

import asyncio

from beanie import init_beanie
from pymongo import AsyncMongoClient

from beanie_tasks import LeaseLost, State, Task
from beanie_tasks.embedded import server_uri
from beanie_tasks.task import utcnow


class Export(Task):
    table: str

    class TaskSettings:
        visibility_timeout = 0.5  # seconds; minutes are more usual
        max_attempts = 3


async def main(uri: str) -> None:
    client = AsyncMongoClient(uri, tz_aware=True)
    await client.drop_database("example_leases")
    await init_beanie(database=client.example_leases, document_models=[Export])
    await Export(table="orders").push()

    task = await Export.pop(consumer_id="worker-a")
    assert task is not None
    print(f"{task.consumer_id} holds the lease until {task.lease_expires_at:%H:%M:%S.%f}")
    await task.set_progress(0.25, "scanned 1/4")  # records progress and extends the lease
    await task.heartbeat()  # extends the lease

    # worker-a stalls past its lease...
    assert task.lease_expires_at is not None
    await asyncio.sleep((task.lease_expires_at - utcnow()).total_seconds() + 0.1)
    recovered = await Export.recover_expired()  # queue() and the worker run this periodically
    print(f"recovered {recovered} task(s) whose lease expired")

    again = await Export.pop(consumer_id="worker-b")
    # The lost lease cost a redelivery, not an attempt.
    assert again is not None and again.id == task.id and again.attempts == 1 and again.redeliveries == 1
    try:
        await task.finish(result="stale")
    except LeaseLost as exc:
        print(f"worker-a: {exc}")
    await again.finish(result="fresh")

    stored = await Export.get(task.id)
    assert stored is not None and stored.state is State.FINISHED and stored.result == "fresh"
    await client.drop_database("example_leases")
    await client.close()


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
