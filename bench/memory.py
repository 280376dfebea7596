"""Peak and steady RSS of a consumer process running many no-op tasks.

The harness keeps the live collection small (it refills in chunks and deletes
finished tasks), because the bundled server scans collections: what grows here is
the count of tasks the worker has run, not the size of the queue.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]
from beanie import init_beanie

from beanie_tasks.driver import client_for, close_client
from beanie_tasks.states import State
from beanie_tasks.task import utcnow
from bench.ours import BenchJob

# Keep about this many tasks waiting: enough that the worker never idles, few enough to scan fast.
REFILL = 32
ROOT = Path(__file__).resolve().parent.parent
LOW_WATER = 16


@dataclass(frozen=True)
class MemoryRun:
    tasks: int
    concurrency: int
    seconds: float
    samples: list[tuple[int, float]]  # (tasks done, RSS MiB)
    peak_mib: float

    @property
    def warm_mib(self) -> float:
        """RSS once the first tenth of the tasks has run (imports and pools settled)."""
        warm = [rss for done, rss in self.samples if done >= self.tasks // 10]
        return warm[0] if warm else self.samples[0][1]

    @property
    def final_mib(self) -> float:
        return self.samples[-1][1]

    @property
    def growth_kib_per_1000(self) -> float:
        span = self.samples[-1][0] - self.tasks // 10
        return (self.final_mib - self.warm_mib) * 1024 / span * 1000 if span > 0 else 0.0


def high_water_mib(pid: int) -> float:
    """The kernel's own peak RSS of a process (Linux ``VmHWM``); 0 where unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def measure_memory(uri: str, tasks: int, concurrency: int) -> MemoryRun:
    database = f"bench_mem_{uuid.uuid4().hex[:8]}"
    client = client_for(uri)
    await init_beanie(database=client[database], document_models=[BenchJob])
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.memory_worker", uri, database, str(concurrency),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    process = psutil.Process(worker.pid)
    samples: list[tuple[int, float]] = []
    peak = 0.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        assert worker.stdout is not None
        await asyncio.wait_for(worker.stdout.readline(), 60)
        pushed = finished = 0
        next_sample = 0
        collection = BenchJob.collection()
        while finished < tasks:
            waiting = await collection.count_documents({"state": State.CREATED.value})
            if waiting < LOW_WATER and pushed < tasks:
                chunk = min(REFILL, tasks - pushed)
                await BenchJob.insert_many([BenchJob(run_at=utcnow(), max_attempts=1) for _ in range(chunk)])
                pushed += chunk
            finished += (await collection.delete_many({"state": State.FINISHED.value})).deleted_count
            rss = process.memory_info().rss / 2**20
            peak = max(peak, rss, high_water_mib(worker.pid))
            if finished >= next_sample:
                samples.append((finished, rss))
                next_sample = finished + max(tasks // 20, 1)
            if worker.returncode is not None:
                raise RuntimeError(f"the worker exited with code {worker.returncode}")
            await asyncio.sleep(0.1)
        samples.append((finished, process.memory_info().rss / 2**20))
    finally:
        if worker.returncode is None:
            worker.terminate()
        await asyncio.wait_for(worker.wait(), 30)
        await client.drop_database(database)
        await close_client(client)
    return MemoryRun(tasks, concurrency, loop.time() - started, samples, peak)
