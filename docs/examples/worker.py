"""A worker runs each class's run(): async or plain def, results stored, progress reported, retries honoured."""

import asyncio
import hashlib
import uuid

from beanie import init_beanie

from beanie_tasks import Backoff, State, Task, Worker
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.embedded import server_uri

DATABASE = f"example_worker_{uuid.uuid4().hex[:8]}"


class Thumbnail(Task):
    """An async handler: what it returns becomes the task's result."""

    image: str
    sizes: list[int]

    class TaskSettings:
        timeout = 30  # seconds; a run that takes longer is cancelled and counts as a failed attempt
        visibility_timeout = 60  # the lease; the worker extends it every heartbeat_interval (default: a third)

    async def run(self) -> dict[str, str]:
        made = {}
        for done, size in enumerate(self.sizes, start=1):
            await asyncio.sleep(0.01)  # stands in for real image work
            made[str(size)] = f"{self.image}@{size}px"
            await self.set_progress(done / len(self.sizes), f"{size}px done")
        return made


class Checksum(Task):
    """A plain def runs in a worker thread, so blocking code does not stall the event loop."""

    text: str

    def run(self) -> str:
        digest = hashlib.sha256()
        chunks = [self.text[i : i + 4] for i in range(0, len(self.text), 4)]
        for done, chunk in enumerate(chunks, start=1):
            digest.update(chunk.encode())
            # From a thread: the sync twin of set_progress (raises TaskCancelled once cancelled).
            self.set_progress_sync(done / len(chunks), f"{done} of {len(chunks)} chunks")
        return digest.hexdigest()


class Flaky(Task):
    """An exception fails the attempt; the class's retry policy decides what happens next."""

    class TaskSettings:
        max_attempts = 3
        backoff = Backoff(base=0.05, jitter=0)

    async def run(self) -> str:
        if self.attempts < 3:
            raise ConnectionError(f"upstream busy (attempt {self.attempts})")
        return "third time lucky"


async def main(uri: str) -> None:
    client = client_for(uri)
    await init_beanie(database=client[DATABASE], document_models=[Thumbnail, Checksum, Flaky])
    thumbnail = await Thumbnail(image="cat.png", sizes=[64, 128, 256]).push()
    checksum = await Checksum(text="hello").push()
    flaky = await Flaky().push()

    worker = Worker([Thumbnail, Checksum, Flaky], concurrency=4)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))  # `beanie-tasks worker MODULE` does this for you
    try:
        for task in (thumbnail, checksum, flaky):
            done = await task.wait(timeout=30)
            print(f"{type(done).__name__}: {done.state.value} after {done.attempts} attempt(s): {done.result}")
            assert done.state is State.FINISHED
        assert (await Thumbnail.get(thumbnail.id)).progress == 1.0  # type: ignore[union-attr]
        assert (await Checksum.get(checksum.id)).progress_message == "2 of 2 chunks"  # type: ignore[union-attr]
    finally:
        stop.set()  # stop claiming, let running tasks finish (grace_period), release the rest
        await running
        await client.drop_database(DATABASE)
        await close_client(client)
    print(f"worker stats: {dict(worker.stats)}")


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
