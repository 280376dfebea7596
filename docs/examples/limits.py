"""Rate and concurrency limits: held in MongoDB, so they hold across every worker process."""

import asyncio
import itertools
import time
import uuid
from typing import ClassVar

from beanie import init_beanie

from beanie_tasks import State, Task, Worker
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.embedded import server_uri

DATABASE = f"example_limits_{uuid.uuid4().hex[:8]}"


class Export(Task):
    """At most one export per tenant at a time, and at most 2 starts per second per tenant."""

    tenant: str
    spans: ClassVar[list[tuple[str, float, float]]] = []

    class TaskSettings:
        key_concurrency = 1  # RUNNING tasks per concurrency_key
        key_rate_limit = "2/s"  # starts per rate_limit_key per second
        rate_limit = "50/s"  # starts of this class per second, all keys together

    async def run(self) -> None:
        started = time.monotonic()
        await asyncio.sleep(0.1)
        Export.spans.append((self.tenant, started, time.monotonic()))


async def main(uri: str) -> None:
    client = client_for(uri)
    await init_beanie(database=client[DATABASE], document_models=[Export])
    pushed = [
        await Export(tenant=tenant, concurrency_key=tenant, rate_limit_key=tenant).push()
        for tenant in ("acme", "globex")
        for _ in range(3)
    ]
    pushed.append(await Export(tenant="none").push())  # no keys: only the class-wide rate applies

    worker = Worker([Export], concurrency=8)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        for task in pushed:
            assert (await task.wait(timeout=30)).state is State.FINISHED
    finally:
        stop.set()
        await running
    for tenant in ("acme", "globex"):
        spans = sorted((start, end) for name, start, end in Export.spans if name == tenant)
        assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans)), "one at a time per tenant"
        print(f"{tenant}: {len(spans)} exports, one at a time, over {spans[-1][1] - spans[0][0]:.2f} s")
    attempts = {t.attempts async for t in Export.find_all()}
    assert attempts == {1}, "waiting for a limit never costs an attempt"
    print("every export ran once; waiting for a limit cost no attempt")
    await client.drop_database(DATABASE)
    await close_client(client)


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
