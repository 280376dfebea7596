"""Retry filters: retry only the errors worth retrying, dead-letter the rest at once."""

import asyncio

from beanie import init_beanie
from pymongo import AsyncMongoClient

from beanie_tasks import Backoff, State, Task, Worker
from beanie_tasks.embedded import server_uri
from beanie_tasks.testing import eventually, running


class ChargeCard(Task):
    card: str

    class TaskSettings:
        max_attempts = 5
        backoff = Backoff(base=0.1, maximum=1, jitter=0)
        retry_on = (TimeoutError, ConnectionError)  # only these are retried...
        dont_retry_on = (ConnectionRefusedError,)  # ...except this one (checked first)

    async def run(self) -> str:
        if self.card == "declined":
            raise ValueError("card declined")  # retrying cannot fix it: FAILED after one attempt
        if self.attempts == 1:
            raise TimeoutError("payment gateway timed out")  # retried
        return f"charged {self.card}"


async def ended(task: Task) -> Task | None:
    stored = await type(task).get(task.id)
    return stored if stored is not None and stored.state.is_terminal else None


async def main(uri: str) -> None:
    client = AsyncMongoClient(uri, tz_aware=True)
    await client.drop_database("example_retry_filters")
    await init_beanie(database=client.example_retry_filters, document_models=[ChargeCard])

    good = await ChargeCard(card="4242").push()
    bad = await ChargeCard(card="declined").push()
    async with running(Worker([ChargeCard], schedules=False)):
        charged = await eventually(lambda: ended(good), timeout=60)
        declined = await eventually(lambda: ended(bad), timeout=60)

    # A task that succeeded on a later attempt has no error, and keeps the retried one as last_error.
    print(
        f"{charged.state.value} after {charged.attempts} attempts: {charged.result} (last_error: {charged.last_error})"
    )
    assert charged.state is State.FINISHED and charged.error is None
    assert charged.last_error == "TimeoutError: payment gateway timed out"

    print(f"{declined.state.value} after {declined.attempts} attempt: {declined.error}")
    assert declined.state is State.FAILED and declined.attempts == 1

    await client.drop_database("example_retry_filters")
    await client.close()


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
