"""Expiry: ended tasks can be deleted automatically; live ones never are."""

import asyncio
from datetime import timedelta

from beanie import init_beanie
from pymongo import AsyncMongoClient

from beanie_tasks import Task
from beanie_tasks.embedded import server_uri


class Ping(Task):
    host: str

    class TaskSettings:
        ttl = timedelta(hours=1)  # keep ended tasks for an hour (default: forever)


async def main(uri: str) -> None:
    client = AsyncMongoClient(uri, tz_aware=True)
    await client.drop_database("example_expiry")
    await init_beanie(database=client.example_expiry, document_models=[Ping])

    await Ping(host="a").push()
    await Ping(host="b").push()
    running = await Ping.pop()
    assert running is not None and running.host == "a"
    assert running.expires_at is None  # CREATED and RUNNING tasks never expire
    await running.finish()
    print(f"finished at {running.finished_at:%H:%M:%S}, deleted after {running.expires_at:%H:%M:%S}")
    assert running.expires_at is not None and running.finished_at is not None
    assert running.expires_at - running.finished_at == timedelta(hours=1)

    indexes = await Ping.collection().index_information()  # the raw driver collection
    print("TTL index:", indexes["bt_expiry"]["key"], "expireAfterSeconds =", indexes["bt_expiry"]["expireAfterSeconds"])
    await client.drop_database("example_expiry")
    await client.close()


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
