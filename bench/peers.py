"""The peer queues, in their own virtualenv (they need Beanie 1.x and Motor), run as subprocesses."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEERS_ENV = ROOT / ".venv" / "bench-peers"
REQUIREMENTS = ["beanie>=1.26,<2", "motor>=3.6", "beanie-batteries-queue==0.4.0", "mongo-taskqueue==1.0.4"]
SCRIPT = Path(__file__).resolve().parent / "peer_workloads.py"
SYSTEMS = ("bbq", "mongotq")


def peers_python(env: Path = PEERS_ENV) -> Path:
    """The bench-peers interpreter, creating the environment on first use (about a minute)."""
    python = env / "bin" / "python"
    marker = env / ".installed"
    wanted = "\n".join(REQUIREMENTS)
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    print(f"bench: creating {env} for the peers ({', '.join(REQUIREMENTS)})", file=sys.stderr, flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(env)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *REQUIREMENTS], check=True
    )
    marker.write_text(wanted)
    return python


async def run_peer(python: Path, system: str, workload: str, uri: str, *options: str, timeout: float = 300) -> Any:
    """Run one workload of one peer and return its JSON answer."""
    process = await asyncio.create_subprocess_exec(
        str(python), str(SCRIPT), system, workload, uri, *options,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"{system} {workload} did not finish within {timeout:.0f}s") from None
    if process.returncode != 0:
        raise RuntimeError(f"{system} {workload} failed:\n{err.decode()[-2000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])
