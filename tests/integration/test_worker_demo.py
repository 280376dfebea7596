"""`make demo` end to end: its own embedded server, two worker processes, a summary, exit 0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.wire


def test_demo_runs_the_pipeline_and_prints_the_summary() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MONGODB_URI"}  # the demo starts its own server
    env["COLUMNS"] = "120"
    done = subprocess.run(
        [sys.executable, "-m", "beanie_tasks.demo"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "on an embedded SecantusDB server" in out
    assert "workers stopped (exit codes [0, 0])" in out
    digest_row = next(line for line in out.splitlines() if "FileDigest" in line and "│" in line)
    cells = [c.strip() for c in digest_row.split("│") if c.strip()]
    # stage, created, running, finished, failed, cancelled, attempts, ...
    assert cells[1:3] == ["0", "0"] and int(cells[3]) > 5 and cells[4:6] == ["0", "0"]
    assert int(cells[6]) == int(cells[3])  # one attempt per file
    report_row = next(line for line in out.splitlines() if "DocsReport" in line and "│" in line)
    assert [c.strip() for c in report_row.split("│") if c.strip()][1:7] == ["0", "0", "1", "0", "0", "1"]
    assert "tree sha256" in out and "demo finished" in out
    assert "The demo's code: beanie_tasks/demo.py" in out and "What to try next:" in out
    assert "docs/examples/quickstart.py" in out
