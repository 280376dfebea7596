"""``make demo``: a small real pipeline on two worker processes, with a live progress display.

It hashes and summarises every file of the repository's ``docs/`` directory (one
``FileDigest`` task per file, run by a plain ``def run`` in a thread), then a ``DocsReport``
task, linked to all of them with an ALL_OF dependency, totals the results once they
have all finished. With no ``MONGODB_URI`` it starts an embedded SecantusDB server; it
stops everything it started and drops its database before it exits.

    python -m beanie_tasks.demo            # the whole demo
    python -m beanie_tasks.demo --dashboard            # the demo, then its data in the web dashboard
    python -m beanie_tasks.demo --worker URI DATABASE   # one of its worker processes
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from beanie import Link, init_beanie
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from beanie_tasks.dependencies import depends_on
from beanie_tasks.driver import client_for, close_client
from beanie_tasks.embedded import free_port, server_uri
from beanie_tasks.states import DependencyType, State
from beanie_tasks.task import Task
from beanie_tasks.worker import Worker

WORKER_PROCESSES = 2
WORKER_CONCURRENCY = 4
DEADLINE_SECONDS = 50.0
WORD = re.compile(r"[A-Za-z][A-Za-z'-]{3,}")


class FileDigest(Task):
    """Hash one file and summarise it: size, lines, words, title, most frequent words."""

    run_id: str
    path: str

    class TaskSettings:
        max_attempts = 3

    def run(self) -> dict[str, Any]:
        data = Path(self.path).read_bytes()
        text = data.decode("utf-8", errors="replace")
        words = [w.lower() for w in WORD.findall(text)]
        title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "")
        return {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "lines": text.count("\n") + (not text.endswith("\n") and bool(text)),
            "words": len(words),
            "title": title[:80],
            "top_words": [w for w, _ in collections.Counter(words).most_common(3)],
        }


class DocsReport(Task):
    """Total the digests once every one of them has finished (an ALL_OF dependency)."""

    run_id: str
    parts: list[Link[FileDigest]] = depends_on(DependencyType.ALL_OF, default_factory=list)

    async def run(self) -> dict[str, Any]:
        digests = await FileDigest.find(FileDigest.run_id == self.run_id, FileDigest.state == State.FINISHED).to_list()
        digests.sort(key=lambda d: d.path)
        combined = hashlib.sha256("".join(d.result["sha256"] for d in digests).encode()).hexdigest()
        words: collections.Counter[str] = collections.Counter()
        for digest in digests:
            words.update(digest.result["top_words"])
        return {
            "files": len(digests),
            "bytes": sum(d.result["bytes"] for d in digests),
            "lines": sum(d.result["lines"] for d in digests),
            "words": sum(d.result["words"] for d in digests),
            "tree_sha256": combined,
            "common_words": [w for w, _ in words.most_common(5)],
        }


STAGES: list[type[Task]] = [FileDigest, DocsReport]


def source_files() -> tuple[Path, list[Path]]:
    """The repository's docs/ (or, in an installed copy without it, this package's own sources)."""
    package = Path(__file__).resolve().parent
    docs = package.parent / "docs"
    root = docs if docs.is_dir() else package
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in {".md", ".py", ".yml", ".txt"})
    return root, files


# ------------------------------------------------------------------ worker process


async def run_worker(uri: str, database: str) -> None:
    client = client_for(uri)
    try:
        await init_beanie(database=client[database], document_models=STAGES)
        worker = Worker(STAGES, concurrency=WORKER_CONCURRENCY, grace_period=5.0)
        worker.install_signal_handlers()
        await worker.run()
    finally:
        await close_client(client)


# ---------------------------------------------------------------------- the demo


def start_workers(uri: str, database: str, log_path: str) -> list[subprocess.Popen[bytes]]:
    with open(log_path, "ab") as log:
        return [
            subprocess.Popen(
                [sys.executable, "-m", "beanie_tasks.demo", "--worker", uri, database],
                stdout=log,
                stderr=log,
            )
            for _ in range(WORKER_PROCESSES)
        ]


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> list[int]:
    for process in workers:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    codes = []
    for process in workers:
        try:
            codes.append(process.wait(15))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append(process.wait(5))
    return codes


async def follow(console: Console, report: DocsReport, files: int) -> None:
    """A live progress bar per stage until the report has ended (or the deadline passes)."""
    columns = (TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bars = {
            FileDigest: progress.add_task("FileDigest", total=files),
            DocsReport: progress.add_task("DocsReport", total=1),
        }
        deadline = time.monotonic() + DEADLINE_SECONDS
        while time.monotonic() < deadline:
            for stage, bar in bars.items():
                counts = await stage.counts()
                progress.update(bar, completed=sum(counts[s] for s in State if s.is_terminal))
            stored = await DocsReport.get(report.id)
            if stored is not None and stored.state.is_terminal:
                return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"the pipeline did not finish within {DEADLINE_SECONDS:.0f} s")


async def summary(console: Console, report: DocsReport, root: Path) -> bool:
    table = Table(title=f"beanie-tasks demo: {root}")
    for column in ("stage", *(s.value.lower() for s in State), "attempts", "stage time", "mean run"):
        table.add_column(column, justify="right" if column != "stage" else "left", no_wrap=True)
    for stage in STAGES:
        tasks = await stage.find_all().to_list()
        counts = collections.Counter(t.state for t in tasks)
        started = [t.started_at for t in tasks if t.started_at is not None]
        finished = [t.finished_at for t in tasks if t.finished_at is not None]
        runs = [(t.finished_at - t.started_at).total_seconds() for t in tasks if t.started_at and t.finished_at]
        table.add_row(
            stage.__name__,
            *(str(counts.get(s, 0)) for s in State),
            str(sum(t.attempts for t in tasks)),
            _span(started, finished),
            f"{1000 * sum(runs) / len(runs):.0f} ms" if runs else "-",
        )
    console.print(table, width=max(console.width, 110))
    stored = await DocsReport.get(report.id)
    if stored is None or stored.state is not State.FINISHED:
        console.print(f"[red]the report did not finish: {stored.state.value if stored else 'missing'}[/red]")
        return False
    result = stored.result
    console.print(
        f"{result['files']} files, {result['lines']} lines, {result['words']} words, {result['bytes']} bytes; "
        f"tree sha256 {result['tree_sha256'][:16]}...; common words: {', '.join(result['common_words'])}"
    )
    return True


def _span(started: list[datetime], finished: list[datetime]) -> str:
    if not started or not finished:
        return "-"
    return f"{(max(finished) - min(started)).total_seconds():.2f} s"


DASHBOARD_PORT = 8080


async def serve_dashboard(console: Console) -> None:
    """Serve the web dashboard on this run's data until Ctrl-C (needs the web extra)."""
    try:
        import uvicorn

        from beanie_tasks.web import dashboard
    except ImportError as exc:
        console.print(
            f"[red]the dashboard needs the web extra ({exc.name} is missing): pip install 'beanie-tasks[web]'"
        )
        return
    port = DASHBOARD_PORT
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            port = free_port()
    console.print(
        f"[bold]open http://127.0.0.1:{port}/[/bold] to see this run in the web dashboard; Ctrl-C ends the demo"
    )
    config = uvicorn.Config(dashboard(STAGES), host="127.0.0.1", port=port, log_level="warning")
    await uvicorn.Server(config).serve()


async def demo(console: Console, *, with_dashboard: bool = False) -> bool:
    root, files = source_files()
    with server_uri() as uri:
        where = "MONGODB_URI" if os.environ.get("MONGODB_URI") else "an embedded SecantusDB server"
        console.print(f"[bold]beanie-tasks demo[/bold]: {len(files)} files from {root}, on {where}")
        database = f"beanie_tasks_demo_{uuid.uuid4().hex[:8]}"
        client = client_for(uri)
        log_path = tempfile.mkstemp(prefix="beanie-tasks-demo-", suffix=".log")[1]
        workers: list[subprocess.Popen[bytes]] = []
        try:
            await init_beanie(database=client[database], document_models=STAGES)
            run_id = uuid.uuid4().hex
            digests = [await FileDigest(run_id=run_id, path=str(path)).push() for path in files]
            report = await DocsReport(run_id=run_id, parts=digests).push()
            workers = start_workers(uri, database, log_path)
            console.print(f"pushed {len(digests)} FileDigest tasks and 1 DocsReport; {len(workers)} workers started")
            await follow(console, report, len(digests))
            codes = stop_workers(workers)
            console.print(f"workers stopped (exit codes {codes})")
            ok = await summary(console, report, root) and all(code == 0 for code in codes)
            if with_dashboard:
                await serve_dashboard(console)
        except BaseException:
            console.print(f"worker log: {log_path}")
            raise
        finally:
            stop_workers(workers)
            await client.drop_database(database)
            await close_client(client)
        if ok:
            os.unlink(log_path)
        else:
            console.print(f"worker log: {log_path}")
        return ok


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--worker"] and len(args) == 3:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(name)s %(message)s")
        asyncio.run(run_worker(args[1], args[2]))
        return 0
    with_dashboard = args == ["--dashboard"]
    if args and not with_dashboard:
        print("usage: python -m beanie_tasks.demo [--dashboard]", file=sys.stderr)
        return 2
    started = time.monotonic()
    # Piped output (CI logs, `make demo | tee`) gets room for the whole summary table.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    ok = asyncio.run(demo(console, with_dashboard=with_dashboard))
    console.print(f"demo {'finished' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s")
    if ok:
        console.print(next_steps())
    return 0 if ok else 1


def shown(path: Path) -> str:
    """``path`` relative to the current directory when it is inside it (a clone's root), else absolute."""
    absolute = Path(os.path.abspath(path))  # not resolve(): a venv's python is a symlink worth keeping
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def next_steps() -> str:
    """Where the demo's code lives and what to try next, for a newcomer who just ran ``make demo``."""
    command = shown(Path(sys.executable).parent / "beanie-tasks")
    return "\n".join(
        [
            f"The demo's code: {shown(Path(__file__))} (its FileDigest and DocsReport tasks, its two workers).",
            "What to try next:",
            f"  - make demo-dashboard: this demo again, then its data in the web dashboard at http://127.0.0.1:{DASHBOARD_PORT}/",
            f"  - {shown(Path(sys.executable))} docs/examples/quickstart.py: push, pop and finish one task",
            "  - docs/examples/: one runnable program per feature; docs/index.md: the guide to all of them",
            f"  - {command} dev-server: a local server for your own tasks; {command} --help: the CLI",
            "  - make test: the whole suite (installs the test tools into .venv)",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
