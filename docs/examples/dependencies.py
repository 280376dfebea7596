"""Dependencies: a small image pipeline where each task waits for the tasks it links to."""

import asyncio

from beanie import init_beanie
from pymongo import AsyncMongoClient

from beanie_tasks import DependencyType, Link, OnFailure, State, Task, depends_on
from beanie_tasks.embedded import server_uri


class Resize(Task):
    image: str


class Publish(Task):
    resize: Link[Resize] = depends_on(DependencyType.DIRECT)


class Report(Task):
    parts: list[Link[Resize]] = depends_on(DependencyType.ALL_OF)  # every part must finish
    any_mirror: list[Link[Resize]] = depends_on(DependencyType.ANY_OF, default_factory=list)  # one is enough


class Cleanup(Task):
    # Runs once every part has ended, whether it finished or failed.
    parts: list[Link[Resize]] = depends_on(DependencyType.ALL_OF, on_failure=OnFailure.RUN)


async def run_all(task_class: type[Task], fail: frozenset[str] = frozenset()) -> list[str]:
    """Claim every ready task of ``task_class``; fail those whose image is in ``fail``."""
    done = []
    while (task := await task_class.pop()) is not None:
        name = getattr(task, "image", type(task).__name__)
        if name in fail:
            await task.fail(f"could not read {name}", retry=False)
        else:
            await task.finish()
        done.append(name)
    return done


async def main(uri: str) -> None:
    client = AsyncMongoClient(uri, tz_aware=True)
    await client.drop_database("example_dependencies")
    await init_beanie(database=client.example_dependencies, document_models=[Resize, Publish, Report, Cleanup])

    a, b, c = [await Resize(image=name).push() for name in ("a.png", "b.png", "c.png")]
    publish = await Publish(resize=a).push()
    report = await Report(parts=[a, b], any_mirror=[c]).push()
    cleanup = await Cleanup(parts=[a, b, c]).push()

    assert await Publish.pop() is None  # parked until a.png is resized
    print("resized:", await run_all(Resize, fail=frozenset({"b.png"})))

    print("published:", len(await run_all(Publish)))
    stored = await Report.get(report.id)
    assert stored is not None and stored.state is State.FAILED
    print("report:", stored.state.value, "-", stored.error)
    print("cleanup ran:", len(await run_all(Cleanup)))

    for task in (publish, cleanup):
        final = await type(task).get(task.id)
        assert final is not None and final.state is State.FINISHED
    await client.drop_database("example_dependencies")
    await client.close()


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
