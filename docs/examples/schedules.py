"""Periodic tasks: an interval run by a worker, and a cron schedule ticked by hand."""

import asyncio
from datetime import datetime, timedelta, timezone

from beanie import init_beanie

from beanie_tasks import State, Task
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.embedded import server_uri
from beanie_tasks.schedule import tick
from beanie_tasks.worker import Worker


class Heartbeat(Task):
    """Every second: the worker's scheduler pushes one task per slot."""

    class TaskSettings:
        every = timedelta(seconds=1)

    async def run(self) -> str:
        return "still alive"


class NightlyReport(Task):
    """At 03:00 UTC every day; ``for_slot`` builds the task for the slot it belongs to."""

    day: str

    class TaskSettings:
        cron = "0 3 * * *"

    @classmethod
    def for_slot(cls, slot: datetime) -> "NightlyReport":
        return cls(day=slot.date().isoformat())

    async def run(self) -> str:
        return f"report for {self.day}"


async def main(uri: str) -> None:
    client = client_for(uri)
    await client.drop_database("example_schedules")
    await init_beanie(database=client.example_schedules, document_models=[Heartbeat, NightlyReport])

    # 1. A worker runs the schedules of its classes in the background. Start as many
    #    workers as you like: each slot still produces exactly one task.
    stop = asyncio.Event()
    worker = Worker([Heartbeat], concurrency=2)
    running = asyncio.create_task(worker.run(stop=stop))
    for _ in range(150):  # wait (at most 15 s) for two beats to be done
        if await Heartbeat.find({"state": State.FINISHED.value}).count() >= 2:
            break
        await asyncio.sleep(0.1)
    stop.set()
    await running
    beats = await Heartbeat.find({"state": State.FINISHED.value}).sort("run_at").to_list()
    print("heartbeats:", [beat.run_at.isoformat() for beat in beats if beat.run_at])
    assert len(beats) >= 2 and len({beat.run_at for beat in beats}) == len(beats)

    # 2. tick() runs one scheduling pass at a chosen time: handy in tests.
    day_one = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    assert await tick([NightlyReport], day_one) == 0  # first sighting: the series starts after now
    assert await tick([NightlyReport], day_one + timedelta(days=1)) == 1  # the 2 May 03:00 slot
    assert await tick([NightlyReport], day_one + timedelta(days=1, hours=1)) == 0  # already scheduled
    assert await tick([NightlyReport], day_one + timedelta(days=4)) == 1  # missed slots: only the latest
    reports = await NightlyReport.find_all().sort("run_at").to_list()
    print("nightly reports:", [report.day for report in reports])
    assert [report.day for report in reports] == ["2024-05-02", "2024-05-05"]

    await client.drop_database("example_schedules")
    await close_client(client)


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
