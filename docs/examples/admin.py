"""Admin helpers: counts per state, requeueing the dead letters, purging old work."""

import asyncio

from beanie import init_beanie
from pymongo import AsyncMongoClient

from beanie_tasks import State, Task
from beanie_tasks.embedded import server_uri


class Sync(Task):
    account: str


async def main(uri: str) -> None:
    client = AsyncMongoClient(uri, tz_aware=True)
    await client.drop_database("example_admin")
    await init_beanie(database=client.example_admin, document_models=[Sync])
    for account in ("a", "b", "c", "d"):
        await Sync(account=account).push()
    for outcome in ("finish", "fail", "fail"):
        task = await Sync.pop()
        assert task is not None
        await (task.finish() if outcome == "finish" else task.fail("remote API down"))

    counts = await Sync.counts()
    print({state.value: n for state, n in counts.items()})
    assert counts[State.FAILED] == 2 and counts[State.CREATED] == 1

    requeued = await Sync.requeue_failed()  # the API is back: try the dead letters again
    print(f"requeued {requeued}")
    assert (await Sync.counts())[State.CREATED] == 3

    purged = await Sync.purge([State.FINISHED, State.CANCELLED])
    print(f"purged {purged}")
    try:
        await Sync.purge([State.CREATED])
    except ValueError as exc:
        print(f"refused: {exc}")
    assert await Sync.purge([State.CREATED], force=True) == 3

    await client.drop_database("example_admin")
    await client.close()


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
