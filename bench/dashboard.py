"""Render time of the dashboard's overview, list and detail pages over a queue of 10,000 tasks.

    python -m bench.dashboard                 # 10,000 tasks, against MONGODB_URI or a bundled server
    python -m bench.dashboard --quick         # 1,000 tasks, 3 requests per page

Pages are requested through httpx's ASGI transport, so the time is the dashboard's own
(its queries and its templates), without a network hop or an HTTP server. Writes
bench/results/dashboard.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
from beanie import init_beanie

from beanie_tasks import Task
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.embedded import EmbeddedServer
from beanie_tasks.web import dashboard

RESULTS = Path(__file__).resolve().parent / "results"


class Rendered(Task):
    customer: str
    amount: float = 0.0


@contextlib.contextmanager
def server_uri() -> Iterator[str]:
    configured = os.environ.get("MONGODB_URI")
    if configured:
        yield configured
        return
    with EmbeddedServer() as server:
        yield server.uri


async def fill(tasks: int) -> Rendered:
    """``tasks`` CREATED tasks of three priorities, then 5% finished and 1% failed."""
    chunk = 100
    last = None
    for start in range(0, tasks, chunk):
        pushed = await asyncio.gather(
            *(
                Rendered(customer=f"c{n}", amount=n, priority=1 + n % 3).push()
                for n in range(start, min(tasks, start + chunk))
            )
        )
        last = pushed[-1]
    for n in range(tasks // 20 + tasks // 100):
        claimed = await Rendered.pop()
        if claimed is None:
            break
        await (claimed.finish({"ok": True}) if n % 6 else claimed.fail("card declined"))
    assert last is not None
    return last


async def timed(http: httpx.AsyncClient, path: str, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        answer = await http.get(path)
        times.append((time.perf_counter() - started) * 1000)
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
    return times


async def run(tasks: int, repeat: int) -> str:
    with server_uri() as uri:
        client = client_for(uri)
        name = f"bench_dashboard_{uuid.uuid4().hex[:8]}"
        try:
            await init_beanie(database=client[name], document_models=[Rendered])
            started = time.perf_counter()
            sample = await fill(tasks)
            print(f"filled {tasks} tasks in {time.perf_counter() - started:.1f} s")
            pages = {
                "overview": "/",
                "list, newest first": "/tasks/Rendered",
                "list, queue order (CREATED)": "/tasks/Rendered?state=CREATED&sort=queue",
                "list, FAILED, newest ended": "/tasks/Rendered?state=FAILED&sort=ended",
                "detail": f"/tasks/Rendered/{sample.id}",
            }
            transport = httpx.ASGITransport(app=dashboard([Rendered]))
            rows = []
            async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=120) as http:
                for label, path in pages.items():
                    await http.get(path)  # warm the templates and the connection pool
                    times = await timed(http, path, repeat)
                    rows.append(f"| {label} | {statistics.median(times):.1f} | {max(times):.1f} |")
                    print(rows[-1])
        finally:
            await client.drop_database(name)
            await close_client(client)
    where = "MONGODB_URI" if os.environ.get("MONGODB_URI") else "the bundled SecantusDB server"
    return "\n".join(
        [
            "# Dashboard render time",
            "",
            f"{tasks:,} tasks of one class on {where}; {repeat} requests per page through httpx's ASGI transport.",
            "",
            "| page | median ms | slowest ms |",
            "|---|---:|---:|",
            *rows,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1,000 tasks and 3 requests per page")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.repeat = 1_000, 3
    report = asyncio.run(run(args.tasks, args.repeat))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dashboard.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
