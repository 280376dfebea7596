"""Missed slots: a late tick skips them with a warning (the default), or catches them up, oldest first."""

import asyncio
import logging
from datetime import datetime, timedelta, timezone

from beanie import init_beanie

from beanie_tasks import Task
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.embedded import server_uri
from beanie_tasks.schedule import tick


class CacheRefresh(Task):
    """Hourly; only the latest run matters, so a late tick pushes one task and logs the rest."""

    class TaskSettings:
        cron = "0 * * * *"  # missed = "skip" is the default


class HourlyInvoices(Task):
    """Hourly; every hour must be billed, so a late tick pushes each missed hour, at most a day of them."""

    hour: str

    class TaskSettings:
        cron = "0 * * * *"
        missed = "catch_up"
        catch_up_limit = 24

    @classmethod
    def for_slot(cls, slot: datetime) -> "HourlyInvoices":
        return cls(hour=slot.strftime("%Y-%m-%d %H:%M"))


async def main(uri: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    client = client_for(uri)
    await client.drop_database("example_missed_slots")
    await init_beanie(database=client.example_missed_slots, document_models=[CacheRefresh, HourlyInvoices])
    classes = [CacheRefresh, HourlyInvoices]

    start = datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc)
    assert await tick(classes, start) == 0  # first sighting: both series start after 12:00

    # Every worker was down from 12:30 to 15:01: the 13:00, 14:00 and 15:00 slots are due.
    # CacheRefresh pushes 15:00 and warns that it skipped 13:00 and 14:00;
    # HourlyInvoices pushes all three, oldest first.
    assert await tick(classes, start + timedelta(hours=2, minutes=31)) == 1 + 3
    refreshes = await CacheRefresh.find_all().sort("run_at").to_list()
    print("cache refreshes:", [task.run_at.isoformat() for task in refreshes if task.run_at])
    assert [task.run_at for task in refreshes] == [datetime(2024, 5, 1, 15, tzinfo=timezone.utc)]
    invoices = await HourlyInvoices.find_all().sort("run_at").to_list()
    print("invoice runs:", [task.hour for task in invoices])
    assert [task.hour for task in invoices] == ["2024-05-01 13:00", "2024-05-01 14:00", "2024-05-01 15:00"]

    # Down for two days: HourlyInvoices catches up the newest 24 hours and warns that
    # catch_up_limit dropped the 24 before them.
    assert await tick([HourlyInvoices], datetime(2024, 5, 3, 15, 1, tzinfo=timezone.utc)) == 24
    invoices = await HourlyInvoices.find_all().sort("run_at").to_list()
    assert len(invoices) == 3 + 24 and invoices[3].hour == "2024-05-02 16:00"

    await client.drop_database("example_missed_slots")
    await close_client(client)


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
