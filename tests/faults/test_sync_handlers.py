"""Sync handlers never overlap: a timed-out thread is not run over, and a queued run is not timed out.

Contract: a plain ``def run(self)`` runs in a thread; its ``timeout`` is measured from the
moment the thread started, the next attempt of the task starts only after the timed-out
thread ended, and a task waiting for a thread is never failed as "timed out". With
``TaskSettings.executor = "process"`` the handler runs in a child process, which the
worker kills when the timeout passes.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from workerkit import background, until

from beanie_tasks import Backoff, State, Task, Worker

TERMINAL = {State.FINISHED, State.FAILED, State.CANCELLED}
SLEEP = 1.5
TIMEOUT = 0.5
PROCESS_MODULE = "bt_process_sleepers"


class Runs:
    """Every run of a Sleeper: label, attempt, monotonic start and end (None while it runs)."""

    lock = threading.Lock()
    entries: ClassVar[list[dict[str, Any]]] = []

    @classmethod
    def of(cls, label: str) -> list[dict[str, Any]]:
        with cls.lock:
            return sorted((dict(e) for e in cls.entries if e["label"] == label), key=lambda e: e["start"])

    @classmethod
    def all_ended(cls) -> bool:
        with cls.lock:
            return all(e["end"] is not None for e in cls.entries)


class Sleeper(Task):
    label: str
    seconds: float

    def run(self) -> str:
        entry: dict[str, Any] = {"label": self.label, "attempt": self.attempts, "start": time.monotonic(), "end": None}
        with Runs.lock:
            Runs.entries.append(entry)
        try:
            time.sleep(self.seconds)
        finally:
            entry["end"] = time.monotonic()
        return self.label

    class Settings:
        name = "sync_sleepers"

    class TaskSettings:
        timeout = TIMEOUT
        max_attempts = 3
        backoff = Backoff(base=0.0, jitter=0.0)  # retry at once
        poll_interval = 0.1
        recovery_interval = 0.5


@pytest.fixture(autouse=True)
async def models(init_tasks: Callable[..., Awaitable[None]]) -> None:
    Runs.entries.clear()
    await init_tasks(Sleeper)


async def run_until_settled(worker: Worker, tasks: list[Sleeper]) -> dict[str, Sleeper]:
    """Run the worker until every task ended and every handler thread returned; the stored tasks by label."""
    async with background(worker) as job:

        async def settled() -> bool | str:
            states = [(await Sleeper.get(t.id)).state for t in tasks]  # type: ignore[union-attr]
            return (all(s in TERMINAL for s in states) and Runs.all_ended()) or f"{states}, {Runs.entries}"

        await until(settled, timeout=40, what="every task to end and every handler thread to return", job=job)
    found = {t.label: await Sleeper.get(t.id) for t in tasks}
    return {label: task for label, task in found.items() if task is not None}


def assert_no_overlap(runs: list[dict[str, Any]]) -> None:
    for earlier, later in itertools.pairwise(runs):
        assert later["start"] >= earlier["end"], (
            f"attempt {later['attempt']} started {earlier['end'] - later['start']:.2f} s before the thread of "
            f"attempt {earlier['attempt']} ended: two runs of one task overlapped"
        )


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_timed_out_sync_attempts_never_overlap(concurrency: int) -> None:
    """Never two runs at once, sync handlers included: attempt n+1 starts after attempt n's thread ended.

    Every attempt spent was a run that started (and timed out ``timeout`` after it started).
    """
    slow = await Sleeper(label="slow", seconds=SLEEP).push()
    worker = Worker([Sleeper], concurrency=concurrency, use_change_stream=False, schedules=False)
    stored = await run_until_settled(worker, [slow])
    runs = Runs.of("slow")
    assert_no_overlap(runs)
    after = stored["slow"]
    assert after.state is State.FAILED and "timed out" in (after.error or "")
    assert len(runs) == after.attempts == 3, f"{after.attempts} attempts spent, {len(runs)} runs started"
    for entry in runs:
        assert entry["end"] - entry["start"] >= SLEEP * 0.9  # each started thread ran to its end


async def test_task_queued_behind_a_running_thread_is_not_timed_out_unstarted() -> None:
    """A task waiting for the busy thread is never failed "timed out" before its run started.

    A delivery that never reached its handler costs no attempt: the quick task finishes on attempt 1.
    """
    slow = await Sleeper(label="slow", seconds=SLEEP).push()
    quick = await Sleeper(label="quick", seconds=0.05).push()
    worker = Worker([Sleeper], concurrency=1, use_change_stream=False, schedules=False)
    stored = await run_until_settled(worker, [slow, quick])
    assert_no_overlap(Runs.of("slow"))
    after = stored["quick"]
    started = Runs.of("quick")
    assert "timed out" not in (after.error or ""), (
        f"quick ended {after.state.value} with {after.error!r} after {after.attempts} attempt(s), "
        f"but its run started {len(started)} time(s) and never ran past the timeout"
    )
    assert after.state is State.FINISHED and after.result == "quick"
    assert after.attempts == 1 and len(started) == 1


class CancelledSleeper(Sleeper):
    """A Sleeper without a timeout whose heartbeat notices a cancel quickly."""

    class Settings:
        name = "sync_cancelled_sleepers"

    class TaskSettings:
        timeout = None
        heartbeat_interval = 0.2
        poll_interval = 0.1


async def test_a_cancelled_thread_holds_its_slot_and_says_so(
    caplog: pytest.LogCaptureFixture, init_tasks: Callable[..., Awaitable[None]]
) -> None:
    """Cancelling a running sync task: it ends CANCELLED without its result, the next task at
    concurrency 1 starts only after the thread returned, and the log says the thread could not be
    interrupted (not that run() was stopped)."""
    caplog.set_level("INFO", logger="beanie_tasks")
    await init_tasks(CancelledSleeper)
    slow = await CancelledSleeper(label="slow", seconds=SLEEP).push()
    await CancelledSleeper(label="after", seconds=0.05).push()
    worker = Worker([CancelledSleeper], concurrency=1, use_change_stream=False, schedules=False)
    async with background(worker) as job:

        async def started(label: str) -> bool:
            return bool(Runs.of(label))

        await until(lambda: started("slow"), timeout=10, what="the slow thread to start", job=job)
        await slow.cancel()
        await until(lambda: started("after"), timeout=20, what="the next task to start", job=job)
    assert Runs.of("after")[0]["start"] >= Runs.of("slow")[0]["end"], "the next task started beside the thread"
    stored = await CancelledSleeper.get(slow.id)
    assert stored is not None and stored.state is State.CANCELLED and stored.result is None
    lines = [r.getMessage() for r in caplog.records if "cancelled while running" in r.getMessage()]
    assert len(lines) == 1 and "could not be interrupted" in lines[0], lines


PROCESS_SOURCE = textwrap.dedent(
    """
    from __future__ import annotations

    import os
    import time
    from pathlib import Path

    from beanie_tasks import Task


    class ProcessSleeper(Task):
        marker: str
        pidfile: str

        def run(self) -> None:
            Path(self.pidfile).write_text(str(os.getpid()))
            time.sleep(30)
            Path(self.marker).write_text("the handler outlived its timeout")

        class Settings:
            name = "sync_process_sleepers"

        class TaskSettings:
            executor = "process"
            timeout = 1
    """
)


def process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


async def test_process_executor_kills_a_handler_that_times_out(
    init_tasks: Callable[..., Awaitable[None]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``executor = "process"``: a sync handler past its timeout is killed, so its later side effect never happens."""
    (tmp_path / f"{PROCESS_MODULE}.py").write_text(PROCESS_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, PROCESS_MODULE, raising=False)
    sleeper: Any = importlib.import_module(PROCESS_MODULE).ProcessSleeper
    await init_tasks(sleeper)
    marker, pidfile = tmp_path / "side-effect", tmp_path / "handler.pid"
    task = await sleeper(marker=str(marker), pidfile=str(pidfile)).push()
    worker = Worker([sleeper], concurrency=1, use_change_stream=False, schedules=False)
    pid: int | None = None
    try:
        async with background(worker) as job:

            async def handler_started() -> bool:
                return pidfile.exists() and pidfile.read_text().strip().isdigit()

            await until(handler_started, timeout=20, what="the handler to start in a child process", job=job)
            pid = int(pidfile.read_text())
            assert pid != os.getpid(), "the handler ran in the worker's own process"

            async def timed_out() -> bool | str:
                stored = await sleeper.get(task.id)
                ended = stored.state in (State.FAILED, State.CREATED) and "timed out" in (stored.error or "")
                return ended or f"{stored.state.value}: {stored.error}"

            await until(timed_out, timeout=5, what="the task to be failed as timed out", job=job)

            async def handler_gone() -> bool:
                return not process_alive(pid)  # type: ignore[arg-type]

            await until(handler_gone, timeout=5, what=f"the handler's process {pid} to be killed")
        await asyncio.sleep(0)
        assert not marker.exists(), "the handler's side effect after its timeout happened"
    finally:
        if pid is not None and process_alive(pid):
            os.kill(pid, signal.SIGKILL)


class Reporter(Task):
    """A sync handler that reports progress from its thread, step by step."""

    steps: int = 3

    def run(self) -> str:
        for step in range(1, self.steps + 1):
            try:
                self.set_progress_sync(step / self.steps, f"step {step}")
            except BaseException as exc:
                Reporter.raised.append(type(exc).__name__)
                raise
            Reporter.reported.append(step)
            Reporter.go_on.wait(10)
        return "reported"

    reported: ClassVar[list[int]] = []
    raised: ClassVar[list[str]] = []
    go_on: ClassVar[threading.Event] = threading.Event()

    class Settings:
        name = "sync_reporters"

    class TaskSettings:
        heartbeat_interval = 0.2
        poll_interval = 0.1


async def test_a_sync_handler_reports_progress_and_sees_a_cancel(init_tasks: Callable[..., Awaitable[None]]) -> None:
    """``set_progress_sync`` from a worker thread stores the progress at once; after a cancel the
    next report raises ``TaskCancelled`` in the thread, so the handler stops at its next step."""
    await init_tasks(Reporter)
    Reporter.reported.clear()
    Reporter.raised.clear()
    Reporter.go_on.clear()
    task = await Reporter(steps=50).push()
    worker = Worker([Reporter], concurrency=1, use_change_stream=False, schedules=False)
    async with background(worker) as job:

        async def first_step_stored() -> bool | str:
            stored = await Reporter.get(task.id)
            return (stored is not None and stored.progress == 1 / 50 and stored.progress_message == "step 1") or str(
                stored and (stored.progress, stored.progress_message)
            )

        await until(first_step_stored, timeout=10, what="the first step's progress to be stored", job=job)
        await task.cancel()
        Reporter.go_on.set()  # the thread goes on to its next report

        async def ended() -> bool:
            return worker.stats.get("cancelled", 0) == 1 and bool(Reporter.raised)

        await until(ended, timeout=10, what="the cancel to be settled", job=job)
    assert Reporter.reported == [1], f"the handler went on after the cancel: {Reporter.reported}"
    stored = await Reporter.get(task.id)
    assert stored is not None and stored.state is State.CANCELLED
    assert Reporter.raised == ["TaskCancelled"]


async def test_set_progress_sync_outside_a_worker_thread_says_where_it_works() -> None:
    task = Sleeper(label="x", seconds=0)
    with pytest.raises(RuntimeError, match=r"works in a sync run\(\) executed by a worker thread"):
        task.set_progress_sync(0.5)
