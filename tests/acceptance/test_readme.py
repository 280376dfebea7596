"""The README stays true: two commands first, then an example that runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from beanie_tasks.embedded import EmbeddedServer

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DATABASE_IN_EXAMPLE = "client.app"

# Runs the README's ``main(uri)``, then checks from outside that the task ended FINISHED.
HARNESS = textwrap.dedent(
    """

    async def _readme_check(uri: str, name: str) -> None:
        await main(uri)
        client = AsyncMongoClient(uri, tz_aware=True)
        try:
            database = client[name]
            finished = [
                document
                for collection in await database.list_collection_names()
                async for document in database[collection].find({"state": "FINISHED"})
            ]
            assert len(finished) == 1, finished
            assert finished[0]["result"] == {"sent": True}, finished[0]
            assert finished[0]["priority"] == 3
        finally:
            await client.drop_database(name)
            await client.close()


    if __name__ == "__main__":
        import asyncio as _asyncio
        import sys as _sys

        _asyncio.run(_readme_check(_sys.argv[1], _sys.argv[2]))
    """
)


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def test_the_two_commands_come_first() -> None:
    first_block = re.search(r"```(\w*)\n(.*?)```", README, flags=re.DOTALL)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(2).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    assert README.index("make demo") < README.index("```python")


def test_the_example_runs(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    blocks = python_blocks(README)
    assert len(blocks) == 1, "the README has one short example"
    example = blocks[0]
    for name in ("class SendEmail(Task)", ".push(", ".pop()", ".finish(", "init_beanie(database="):
        assert name in example
    assert example.count(DATABASE_IN_EXAMPLE) == 1, "the harness points the example at its own database"
    database = f"bt_readme_{uuid.uuid4().hex[:8]}"
    script = tmp_path / "readme_example.py"
    script.write_text(example.replace(DATABASE_IN_EXAMPLE, f"client[{database!r}]") + HARNESS)
    uri = os.environ.get("MONGODB_URI")
    if not uri:
        server: EmbeddedServer = request.getfixturevalue("secantus")
        uri = server.uri
    outcome = subprocess.run(
        [sys.executable, str(script), uri, database],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert outcome.returncode == 0, outcome.stdout[-3000:] + outcome.stderr[-3000:]
