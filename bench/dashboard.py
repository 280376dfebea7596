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
import os
import statistics
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
from beanie import init_beanie
from bson import ObjectId

from beanie_tasks import Task
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.embedded import server_uri
from beanie_tasks.web import dashboard

RESULTS = Path(__file__).resolve().parent / "results"


class Rendered(Task):
    customer: str
    amount: float = 0.0


async def fill(tasks: int) -> Rendered:
    """``tasks`` tasks: 94% CREATED over three priorities, 5% FINISHED, 1% FAILED.

    One task is pushed for real; the rest are copies of its stored document written with
    ``insert_many`` (the setup, not what is measured, so it stays short on a slow server).
    """
    first = await Rendered(customer="c0", amount=0.0).push()
    template = await Rendered.task_store().find_by_id(first.id)
    assert template is not None
    now = template["created_at"]
    documents = []
    for n in range(1, tasks):
        document = dict(template) | {"_id": ObjectId(), "customer": f"c{n}", "amount": float(n), "priority": 1 + n % 3}
        if n % 100 < 6:
            failed = n % 100 == 5
            document |= {
                "state": "FAILED" if failed else "FINISHED",
                "attempts": 1,
                "finished_at": now - timedelta(seconds=n % 3000),
                "error": "card declined" if failed else None,
                "result": None if failed else {"ok": True},
            }
        documents.append(document)
    collection = Rendered.collection()
    for start in range(0, len(documents), 1000):
        await collection.insert_many(documents[start : start + 1000])
    return first


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
            "SecantusDB serves no sort from an index and scans for counts, so on it the overview and the lists",
            "grow with the collection; on MongoDB every list page is one index range",
            "(tests/integration/test_dashboard_plans.py).",
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
