"""Every program in docs/examples runs and exits 0, against the session's test server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from beanie_tasks.embedded import EmbeddedServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.py"))
TIMEOUT = 180


@pytest.fixture(scope="module")
def example_uri(request: pytest.FixtureRequest) -> str:
    """MONGODB_URI when set, else the session's SecantusDB server."""
    configured = os.environ.get("MONGODB_URI")
    if configured:
        return configured
    server: EmbeddedServer = request.getfixturevalue("secantus")
    return server.uri


def run_example(path: Path, uri: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MONGODB_URI": uri, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 10, EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path: Path, example_uri: str) -> None:
    outcome = run_example(path, example_uri)
    assert outcome.returncode == 0, (
        f"{path.name} exited {outcome.returncode}\n{outcome.stdout[-3000:]}\n{outcome.stderr[-3000:]}"
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_included_by_a_docs_page(path: Path) -> None:
    include = f'--8<-- "docs/examples/{path.name}"'
    pages = [page for page in (ROOT / "docs").glob("*.md") if include in page.read_text()]
    if not pages:
        pytest.skip(f"no page includes {path.name} yet")
