"""Pushing many tasks at once: one insert_many per 1,000 tasks, and one outcome per task."""

import asyncio
from collections import Counter

from beanie import Link, init_beanie
from pymongo import AsyncMongoClient, monitoring

from beanie_tasks import DependencyType, PushStatus, Task, depends_on
from beanie_tasks.embedded import server_uri
from beanie_tasks.task import FAR_FUTURE


class Commands(monitoring.CommandListener):
    """Counts the inserts the client sends."""

    inserts = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.inserts += event.command_name == "insert"

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


class Welcome(Task):
    to: str


class Digest(Task):
    """Sent once every welcome it links has been sent."""

    welcomes: list[Link[Welcome]] = depends_on(DependencyType.ALL_OF, default_factory=list)


async def main(uri: str) -> None:
    commands = Commands()
    client = AsyncMongoClient(uri, tz_aware=True, event_listeners=[commands])
    await client.drop_database("example_push_many")
    await init_beanie(database=client.example_push_many, document_models=[Welcome, Digest])

    # A thousand independent tasks: one insert command.
    welcomes = [Welcome(to=f"user{i}@example.com", dedupe_key=f"welcome:{i}") for i in range(1000)]
    outcomes = await Welcome.push_many(welcomes)
    print(f"{sum(o.pushed for o in outcomes)} pushed with {commands.inserts} insert command(s)")
    assert commands.inserts == 1 and all(o.pushed for o in outcomes)

    # One outcome per task: a bad task or a dedupe clash never costs the others their push.
    again = Welcome(to="user7@example.com", dedupe_key="welcome:7")  # that key is in flight
    broken = Welcome(to="nobody")
    broken.to = None  # type: ignore[assignment]  # assignment is not validated; push_many validates
    fresh = Welcome(to="new@example.com")
    digest = Digest(welcomes=[fresh, welcomes[0]])  # type: ignore[list-item]  # links a task of the same call
    outcomes = await Task.push_many([digest, again, broken, fresh])
    print(Counter(o.status.value for o in outcomes))
    for outcome in outcomes:
        if outcome.status is PushStatus.REJECTED:
            print(f"rejected: {outcome.error}")
    assert [o.status for o in outcomes] == [
        PushStatus.PUSHED,
        PushStatus.DUPLICATE,
        PushStatus.REJECTED,
        PushStatus.PUSHED,
    ]
    assert outcomes[1].id == welcomes[7].id  # the task holding the key
    assert digest.run_at == FAR_FUTURE  # parked until both welcomes are sent

    await client.drop_database("example_push_many")
    await client.close()


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
