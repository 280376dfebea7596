"""Reliability: a crashed consumer's task comes back, a repeated finish is safe, bad documents are set aside."""

import asyncio

from beanie import init_beanie

from beanie_tasks import LeaseLost, State, Task
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.embedded import server_uri
from beanie_tasks.redact import redact_uri


class Charge(Task):
    order: str

    class TaskSettings:
        visibility_timeout = 0.5  # short, so the example does not wait long
        max_attempts = 3


async def main(uri: str) -> None:
    client = client_for(uri)
    await client.drop_database("example_reliability")
    await init_beanie(database=client.example_reliability, document_models=[Charge])

    await Charge(order="A-1").push()
    crashed = await Charge.pop(consumer_id="worker-that-dies")
    assert crashed is not None
    # ... the process dies here: nobody finishes it, nobody heartbeats it.

    for _ in range(100):  # recovery runs regularly inside every queue() and Worker
        if await Charge.recover_expired():
            break
        await asyncio.sleep(0.1)
    again = await Charge.pop(consumer_id="healthy-worker")
    assert again is not None and again.attempts == 1 and again.redeliveries == 1  # delivered again, unspent
    await again.finish({"charged": True})
    await again.finish({"charged": True})  # a retry after a lost acknowledgement: success, not LeaseLost
    try:
        await crashed.finish({"charged": True})  # the dead worker's lease is gone for good
    except LeaseLost as exc:
        print(f"stale worker refused: {exc}")

    # A document written by hand with a state no claim matches is set aside, with the reason.
    await Charge.collection().insert_one({"order": "A-2", "state": "PAUSED", "priority": 2})
    assert await Charge.set_aside_unclaimable() == 1
    bad = await Charge.find_one(Charge.state == State.FAILED)
    assert bad is not None
    print(f"set aside: {bad.error}")

    print(redact_uri("mongodb+srv://app:hunter2@cluster0.example.mongodb.net/shop"))
    await client.drop_database("example_reliability")
    await close_client(client)


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
