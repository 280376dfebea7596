"""A producer pushes a task and awaits its result with Task.wait()."""

import asyncio
import uuid

from beanie import init_beanie

from beanie_tasks import Task, TaskFailed, WaitTimeout, Worker
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.embedded import server_uri

DATABASE = f"example_results_{uuid.uuid4().hex[:8]}"


class Divide(Task):
    a: float
    b: float

    async def run(self) -> float:
        return self.a / self.b


class Never(Task):
    """Nobody runs this class in the example, so waiting for it times out."""

    async def run(self) -> None:
        return None


async def main(uri: str) -> None:
    client = client_for(uri)
    await init_beanie(database=client[DATABASE], document_models=[Divide, Never])
    stop = asyncio.Event()
    worker = asyncio.create_task(Worker([Divide]).run(stop))
    try:
        done = await (await Divide(a=1, b=4).push()).wait(timeout=10)
        print(f"1 / 4 = {done.result}")
        assert done.result == 0.25

        try:
            await (await Divide(a=1, b=0).push()).wait(timeout=10)
        except TaskFailed as failed:
            print(f"1 / 0: {failed}")
            assert failed.task.error == "ZeroDivisionError: float division by zero"

        try:
            await (await Never().push()).wait(timeout=0.5)
        except WaitTimeout as timeout:
            print(f"never: {timeout}")
    finally:
        stop.set()
        await worker
        await client.drop_database(DATABASE)
        await close_client(client)


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
