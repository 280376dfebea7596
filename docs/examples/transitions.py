"""Finishing, failing and cancelling, by hand and with ``async with``."""

import asyncio

from beanie import init_beanie
from pymongo import AsyncMongoClient

from beanie_tasks import State, Task
from beanie_tasks.embedded import server_uri


class Charge(Task):
    card: str
    cents: int


async def main(uri: str) -> None:
    client = AsyncMongoClient(uri, tz_aware=True)
    await client.drop_database("example_transitions")
    await init_beanie(database=client.example_transitions, document_models=[Charge])
    for card in ("ok", "declined", "context-ok", "context-boom", "changed-mind"):
        await Charge(card=card, cents=100).push()

    task = await Charge.pop()
    assert task is not None
    await task.finish(result={"receipt": "r-1"})  # FINISHED, result stored

    task = await Charge.pop()
    assert task is not None
    await task.fail("card declined")  # FAILED (no retries configured)

    async with await Charge.pop() as task:  # type: ignore[union-attr]
        pass  # leaving the block normally finishes the task

    try:
        async with await Charge.pop() as task:  # type: ignore[union-attr]
            raise ConnectionError("gateway timeout")
    except ConnectionError:
        pass  # the task was failed with the error recorded, and the error re-raised

    pending = await Charge.find_one(Charge.card == "changed-mind")
    assert pending is not None and await pending.cancel() is True
    assert await pending.cancel() is False  # already ended

    for charge in await Charge.find_all().sort("+_id").to_list():
        print(f"{charge.card:13} {charge.state.value:9} result={charge.result} error={charge.error}")
    counts = await Charge.counts()
    assert counts[State.FINISHED] == 2 and counts[State.FAILED] == 2 and counts[State.CANCELLED] == 1
    await client.drop_database("example_transitions")
    await client.close()


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
