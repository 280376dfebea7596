"""Claiming and acknowledging tasks in batches, with the commands each step sends counted."""

import asyncio

from beanie import init_beanie
from pymongo import AsyncMongoClient, monitoring

from beanie_tasks import Priority, Task, claim_batch, finish_batch
from beanie_tasks.embedded import server_uri


class CommandCounter(monitoring.CommandListener):
    """Counts the commands the client sends (beanie_tasks.testing has a fuller one)."""

    total = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name not in {"hello", "isMaster", "ismaster", "ping", "endSessions"}:
            self.total += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def reset(self) -> None:
        self.total = 0


class Resize(Task):
    image: str


async def main(uri: str) -> None:
    counter = CommandCounter()
    client = AsyncMongoClient(uri, tz_aware=True, event_listeners=[counter])
    await client.drop_database("example_batch")
    await init_beanie(database=client.example_batch, document_models=[Resize])

    for n in range(20):
        await Resize(image=f"img-{n}.png", priority=Priority.HIGH if n % 5 == 0 else Priority.MEDIUM).push()

    done = 0
    while True:
        counter.reset()
        batch = await claim_batch(Resize, 16, consumer_id="batcher")  # up to 16 tasks, in claim order
        if not batch:
            break
        claimed_with = counter.total
        # ... run the batch here; every task is RUNNING and leased to "batcher" ...
        counter.reset()
        ack = await finish_batch(batch, [f"thumb-{t.image}" for t in batch])
        assert ack.lost == []  # a task whose lease was lost would be listed here, left untouched
        print(f"{len(batch)} tasks: claimed with {claimed_with} commands, acknowledged with {counter.total}")
        if done == 0:
            assert [t.priority for t in batch[:4]] == [Priority.HIGH] * 4  # priority order within the batch
            assert claimed_with == 3 and counter.total == 2  # bulk write + read-back
        done += len(batch)

    assert done == 20
    stored = await Resize.find_one(Resize.image == "img-7.png")
    assert stored is not None and stored.result == "thumb-img-7.png"
    await client.drop_database("example_batch")
    await client.close()


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
