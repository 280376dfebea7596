"""Pushing: now, after a delay, at a time; invalid tasks are rejected before anything is written."""

import asyncio
from datetime import datetime, timedelta, timezone

from beanie import init_beanie
from pydantic import ValidationError
from pymongo import AsyncMongoClient

from beanie_tasks import Task
from beanie_tasks.embedded import server_uri


class Invoice(Task):
    customer: str
    amount_cents: int


async def main(uri: str) -> None:
    client = AsyncMongoClient(uri, tz_aware=True)
    await client.drop_database("example_push")
    await init_beanie(database=client.example_push, document_models=[Invoice])

    now = await Invoice(customer="acme", amount_cents=1200).push()
    soon = await Invoice(customer="globex", amount_cents=500).push(delay=0.5)  # seconds or a timedelta
    later = await Invoice(customer="initech", amount_cents=90).push(
        run_at=datetime.now(timezone.utc) + timedelta(days=1)
    )
    print("due:", [t.run_at.isoformat(timespec="seconds") for t in (now, soon, later) if t.run_at])

    first = await Invoice.pop()
    assert first is not None and first.customer == "acme"
    assert await Invoice.pop() is None  # the delayed ones are not due yet
    await asyncio.sleep(0.6)
    second = await Invoice.pop()
    assert second is not None and second.customer == "globex"

    bad = Invoice(customer="umbrella", amount_cents=1)
    bad.amount_cents = "lots"  # type: ignore[assignment]  # assignment is not validated...
    try:
        await bad.push()  # ...but push() validates the whole task first
    except ValidationError:
        print("invalid task rejected; nothing written")
    assert await Invoice.find(Invoice.customer == "umbrella").count() == 0

    try:
        await Invoice(customer="x", amount_cents=1).push(run_at=datetime.now())  # naive: ambiguous
    except ValueError as exc:
        print(f"rejected: {exc}")

    await client.drop_database("example_push")
    await client.close()


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
