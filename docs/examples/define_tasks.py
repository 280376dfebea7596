"""Defining tasks: typed fields, per-class queue settings, and Beanie's own settings."""

import asyncio
from datetime import timedelta

from beanie import init_beanie
from pydantic import Field, ValidationError
from pymongo import AsyncMongoClient

from beanie_tasks import Backoff, Priority, Task
from beanie_tasks.embedded import server_uri


class ResizeImage(Task):
    """One image to resize; the fields are ordinary pydantic fields."""

    url: str
    width: int = Field(gt=0, le=4096)
    formats: list[str] = ["webp"]

    class TaskSettings:  # how the queue treats this class
        visibility_timeout = timedelta(minutes=2)
        max_attempts = 5
        backoff = Backoff(base=2, factor=2, maximum=60)
        ttl = timedelta(days=7)

    class Settings:  # Beanie's own settings: the collection name
        name = "image_tasks"


async def main(uri: str) -> None:
    client = AsyncMongoClient(uri, tz_aware=True)
    await client.drop_database("example_tasks")
    await init_beanie(database=client.example_tasks, document_models=[ResizeImage])

    options = ResizeImage.task_options
    print(f"lease {options.visibility_timeout}s, up to {options.max_attempts} attempts, kept {options.ttl}s")

    task = await ResizeImage(url="https://example.com/cat.png", width=640, priority=Priority.LOW).push()
    print(f"pushed {task.id} into {ResizeImage.get_settings().name!r}, state {task.state.value}")
    assert task.max_attempts == 5 and task.created_at.tzinfo is not None

    try:
        ResizeImage(url="https://example.com/dog.png", width=0)
    except ValidationError as exc:
        print(f"rejected: {exc.error_count()} validation error")
    else:
        raise AssertionError("width=0 should be rejected")

    await client.drop_database("example_tasks")
    await client.close()


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
