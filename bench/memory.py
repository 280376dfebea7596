"""Peak and steady RSS of a consumer process working through many no-op tasks.

The tasks are fed in waves: a producer keeps at most ``concurrency + 2 * WAVE`` tasks
in flight, pushes another wave as tasks finish, and deletes finished tasks as it goes.
The bundled server scans collections, so queueing all the tasks at once would measure
its scans (a claim on a 10,000-task queue takes most of a second there); fed in waves,
the collection stays small and what grows is only the count of tasks the worker has run.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from beanie import init_beanie

from beanie_tasks.driver import client_for, close_client
from beanie_tasks.states import State
from beanie_tasks.task import utcnow
from bench.ours import BenchJob, stored_form

ROOT = Path(__file__).resolve().parent.parent
# Tasks pushed at once; between one and two waves wait behind the running ones.
WAVE = 20
SAMPLE_EVERY = 0.1  # seconds
# Give up when the worker has finished nothing for this long (it died or hung).
STALL_SECONDS = 120.0


@dataclass(frozen=True)
class MemoryRun:
    tasks: int  # tasks the worker ran (fewer than planned only when the time budget ran out)
    planned: int
    concurrency: int
    seconds: float
    samples: list[tuple[int, float]]  # (tasks done, RSS MiB), one every SAMPLE_EVERY seconds
    peak_mib: float
    most_queued: int  # the most tasks ever in the collection at once (in flight, unfinished)

    @property
    def warm_from(self) -> int:
        """Tasks done before growth is counted: imports and connection pools settle in the first tenth."""
        return self.tasks // 10

    def _warm(self) -> list[tuple[int, float]]:
        return [(done, rss) for done, rss in self.samples if done >= self.warm_from] or self.samples

    @property
    def warm_mib(self) -> float:
        return self._warm()[0][1]

    @property
    def final_mib(self) -> float:
        return self.samples[-1][1]

    @property
    def growth_kib_per_1000(self) -> float:
        """Least-squares slope of RSS against tasks done after warm-up, in KiB per 1,000 tasks."""
        warm = self._warm()
        if len({done for done, _ in warm}) < 2:
            return 0.0
        fit = statistics.linear_regression([done for done, _ in warm], [rss * 1024 for _, rss in warm])
        return fit.slope * 1000

    @property
    def window(self) -> int:
        """Tasks per window of the per-window peaks: 1,000, or a tenth of a smaller run."""
        return 1000 if self.tasks >= 2000 else max(self.tasks // 10, 1)

    def window_peaks(self) -> list[tuple[int, float]]:
        """(tasks done at the window's end, highest RSS sampled in it), window by window."""
        peaks: dict[int, float] = {}
        for done, rss in self.samples:
            end = min(-(-max(done, 1) // self.window) * self.window, self.tasks)
            peaks[end] = max(peaks.get(end, 0.0), rss)
        return sorted(peaks.items())


def high_water_mib(pid: int) -> float:
    """The kernel's own peak RSS of a process (Linux ``VmHWM``); 0 where unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def measure_memory(uri: str, tasks: int, concurrency: int, budget: float) -> MemoryRun:
    """Feed ``tasks`` no-op tasks to a worker, sampling its RSS; stop early after ``budget`` seconds."""
    import psutil  # type: ignore[import-untyped,unused-ignore]  # the bench extra; the report renders without it

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
    most_queued = 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        assert worker.stdout is not None
        await asyncio.wait_for(worker.stdout.readline(), 60)
        collection = BenchJob.collection()
        pushed = finished = 0
        progressed = loop.time()
        while finished < tasks and loop.time() - started < budget:
            # Pushed and not yet deleted = waiting or running: top it up a wave at a time.
            if pushed - finished < concurrency + WAVE and pushed < tasks:
                wave = min(WAVE, tasks - pushed)
                await collection.insert_many(
                    [stored_form(BenchJob(run_at=utcnow(), max_attempts=1)) for _ in range(wave)]
                )
                pushed += wave
            most_queued = max(most_queued, pushed - finished)
            deleted = (await collection.delete_many({"state": State.FINISHED.value})).deleted_count
            finished += deleted
            if deleted:
                progressed = loop.time()
            elif loop.time() - progressed > STALL_SECONDS:
                raise RuntimeError(f"the worker finished nothing for {STALL_SECONDS:g} s ({finished} of {tasks} done)")
            rss = process.memory_info().rss / 2**20
            peak = max(peak, rss, high_water_mib(worker.pid))
            samples.append((finished, rss))
            if worker.returncode is not None:
                raise RuntimeError(f"the worker exited with code {worker.returncode}")
            await asyncio.sleep(SAMPLE_EVERY)
        samples.append((finished, process.memory_info().rss / 2**20))
        peak = max(peak, high_water_mib(worker.pid))
    finally:
        if worker.returncode is None:
            worker.terminate()
        await asyncio.wait_for(worker.wait(), 30)
        await client.drop_database(database)
        await close_client(client)
    return MemoryRun(finished, tasks, concurrency, loop.time() - started, samples, peak, most_queued)
