"""Requeueing a failed task together with the dependents that failed because of it."""

import asyncio

from beanie import Link, init_beanie
from pymongo import AsyncMongoClient

from beanie_tasks import DependencyType, State, Task, depends_on
from beanie_tasks.embedded import server_uri


class Render(Task):
    scene: str


class Upload(Task):
    render: Link[Render] = depends_on(DependencyType.DIRECT)


async def main(uri: str) -> None:
    client = AsyncMongoClient(uri, tz_aware=True)
    await client.drop_database("example_requeue_dependents")
    await init_beanie(database=client.example_requeue_dependents, document_models=[Render, Upload])

    render = await Render(scene="intro").push()
    upload = await Upload(render=render).push()
    claimed = await Render.pop()
    assert claimed is not None
    await claimed.fail("GPU lost", retry=False)  # Upload fails too: its dependency failed
    failed = await Upload.get(upload.id)
    assert failed is not None and failed.state is State.FAILED

    alone = await Upload.requeue_failed_report()  # requeued alone it would run without its render
    print(f"Upload: requeued {alone.requeued}, skipped {alone.skipped}")

    report = await Render.requeue_failed_report(with_dependents=True)
    print(f"Render: requeued {report.requeued}, with {report.dependents} dependent(s)")
    assert (report.requeued, report.dependents) == (1, 1)
    assert await Upload.pop() is None  # it waits for the render again

    again = await Render.pop()
    assert again is not None
    await again.finish()
    uploading = await Upload.pop()
    assert uploading is not None and uploading.id == upload.id
    print(f"Upload runs after its render (its earlier failure: {uploading.last_error})")
    await uploading.finish()

    await client.drop_database("example_requeue_dependents")
    await client.close()


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
