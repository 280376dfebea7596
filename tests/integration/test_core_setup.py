"""A plain init_beanie is the whole setup, on either driver stack; every date reads back UTC-aware."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from beanie import init_beanie

from beanie_tasks import State, Task
from beanie_tasks.driver import BEANIE_MAJOR
from tests.conftest import Backend


class Invoice(Task):
    number: int
    issued: datetime | None = None

    class Settings:
        name = "invoices"


async def test_init_beanie_alone_creates_the_queue_indexes(db: Any) -> None:
    await init_beanie(database=db, document_models=[Invoice])
    indexes = await Invoice.collection().index_information()
    assert {"bt_claim", "bt_lease", "bt_dedupe", "bt_expiry"} <= set(indexes)
    assert indexes["bt_dedupe"].get("unique") is True
    assert Invoice.get_settings().name == "invoices", "Beanie's own Settings still name the collection"
    await init_beanie(database=db, document_models=[Invoice])  # idempotent
    pushed = await Invoice(number=1).push()
    assert (await Invoice.pop()) is not None and pushed.state is State.CREATED


async def test_driver_stack_matches_the_client(backend: Backend, db: Any) -> None:
    if backend.is_mock:
        pytest.skip("mongomock stands in for Motor")
    module = type(db.client).__module__
    assert module.startswith("pymongo") if BEANIE_MAJOR >= 2 else module.startswith("motor")


def assert_aware_utc(value: datetime | None) -> None:
    assert value is not None and value.tzinfo is not None and value.utcoffset() is not None
    assert value.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


async def test_dates_read_back_timezone_aware(db: Any) -> None:
    await init_beanie(database=db, document_models=[Invoice])
    await Invoice(number=2).push()
    task = await Invoice.pop()
    assert task is not None
    for value in (task.created_at, task.run_at, task.started_at, task.lease_expires_at):
        assert_aware_utc(value)
    await task.finish()
    stored = await Invoice.get(task.id)
    assert stored is not None
    for value in (stored.created_at, stored.run_at, stored.started_at, stored.finished_at):
        assert_aware_utc(value)


@pytest.mark.wire
async def test_dates_are_aware_even_on_a_client_without_tz_aware(backend: Backend) -> None:
    client = backend.client(tz_aware=False)
    name = f"bt_naive_{id(client)}"
    try:
        await init_beanie(database=client[name], document_models=[Invoice])
        await Invoice(number=3).push()
        task = await Invoice.pop()
        assert task is not None
        assert_aware_utc(task.run_at)
        assert_aware_utc(task.lease_expires_at)
        stored = await Invoice.get(task.id)
        assert stored is not None
        assert_aware_utc(stored.created_at)
    finally:
        await client.drop_database(name)
        from beanie_tasks.driver import close_client

        await close_client(client)


async def test_non_utc_aware_run_at_is_stored_as_utc(db: Any) -> None:
    from datetime import timedelta

    await init_beanie(database=db, document_models=[Invoice])
    plus_two = timezone(timedelta(hours=2))
    when = datetime(2030, 1, 1, 12, 0, tzinfo=plus_two)
    pushed = await Invoice(number=4).push(run_at=when)
    stored = await Invoice.get(pushed.id)
    assert stored is not None and stored.run_at == when
    assert stored.run_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert stored.run_at.hour == 10
