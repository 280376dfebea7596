"""Worker hooks: a startup hook registers the app's own models, middleware sees every run and its outcome."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from beanie import Document, init_beanie

from beanie_tasks import Backoff, State, Task, TaskFailed, Worker, hooks
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.embedded import server_uri

DATABASE = f"example_hooks_{uuid.uuid4().hex[:8]}"


class Invoice(Document):
    """An ordinary app model, not a task: the worker must initialise it before run() writes one."""

    customer: str
    total: float


class BillCustomer(Task):
    customer: str
    total: float

    class TaskSettings:
        max_attempts = 2
        backoff = Backoff(base=0.05, jitter=0)

    async def run(self) -> str:
        if self.total < 0:
            raise ValueError(f"a negative total for {self.customer}")
        invoice = Invoice(customer=self.customer, total=self.total)
        await invoice.insert()
        return str(invoice.id)


async def app_setup(worker: Worker) -> AsyncIterator[None]:
    """What `beanie-tasks worker myapp.tasks --setup myapp.worker:app_setup` would call."""
    await init_beanie(database=worker.database, document_models=[Invoice])  # the app's other models
    print("startup: Invoice registered, clients opened")
    yield  # the worker runs here
    print("shutdown: clients closed")


class Timings(hooks.Middleware):
    """Middleware: before, on exception and after each run; it can read the task and its outcome."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.outcomes: list[str] = []

    def before_run(self, task: Task) -> None:
        self.started[str(task.id)] = time.perf_counter()

    def on_exception(self, task: Task, error: BaseException) -> None:
        print(f"  {type(task).__name__} attempt {task.attempts} raised {error!r}")

    async def after_run(self, task: Task, outcome: hooks.Outcome) -> None:  # async works too
        took = time.perf_counter() - self.started.pop(str(task.id))
        self.outcomes.append(f"{task.customer}: {outcome.status}")  # type: ignore[attr-defined]
        print(f"  {type(task).__name__} {outcome.status} after {took * 1000:.1f} ms (result {outcome.result!r})")


class Audit:
    """A push hook: any object with before_push / after_push, called around every push() of the process."""

    def before_push(self, task: Task) -> None:
        print(f"pushing {type(task).__name__} {task.id}")

    def after_push(self, task: Task, error: BaseException | None) -> None:
        assert error is None


async def main(uri: str) -> None:
    client = client_for(uri)
    await init_beanie(database=client[DATABASE], document_models=[BillCustomer])  # the worker's classes only
    audit = Audit()
    hooks.add_push_middleware(audit)
    good = await BillCustomer(customer="ada", total=12.5).push()
    bad = await BillCustomer(customer="bob", total=-1).push()
    hooks.remove_push_middleware(audit)

    timings = Timings()
    worker = Worker([BillCustomer], middleware=[timings], on_startup=[app_setup])
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        done = await good.wait(timeout=30)
        assert done.state is State.FINISHED and await Invoice.find_one({"customer": "ada"}) is not None
        try:
            await bad.wait(timeout=30)
        except TaskFailed as failed:  # wait() raises when the task ends FAILED
            assert failed.task.state is State.FAILED
    finally:
        stop.set()
        await running
        await client.drop_database(DATABASE)
        await close_client(client)
    assert sorted(timings.outcomes) == ["ada: finished", "bob: failed", "bob: retrying"], timings.outcomes


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
