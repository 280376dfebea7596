"""The README stays true: install first, a FastAPI example that runs as written, then the two commands."""

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
URI_IN_EXAMPLE = '"mongodb://localhost:27017"'

# Runs the README's app through its lifespan with httpx, as a client of the API would, then
# checks from outside that the task ended FINISHED with its result.
HARNESS = textwrap.dedent(
    """

    async def _readme_check(uri: str, name: str) -> None:
        import asyncio

        import httpx
        from asgi_lifespan import LifespanManager

        try:
            async with LifespanManager(app) as manager:
                transport = httpx.ASGITransport(app=manager.app)
                async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
                    made = await http.post("/thumbnails", params={"url": "https://example.com/cat.png"})
                    assert made.status_code == 200, made.text
                    task_id = made.json()["id"]
                    for _ in range(1200):
                        body = (await http.get(f"/thumbnails/{task_id}")).json()
                        if body["state"] == "FINISHED":
                            break
                        await asyncio.sleep(0.05)
            assert body == {
                "state": "FINISHED",
                "progress": 0.5,
                "result": {"thumbnail": "https://example.com/cat.png?w=128"},
            }, body
            client = AsyncMongoClient(uri, tz_aware=True)
            stored = await client[name]["Thumbnail"].find_one({})
            assert stored is not None and stored["state"] == "FINISHED" and stored["attempts"] == 1, stored
        finally:
            client = AsyncMongoClient(uri, tz_aware=True)
            await client.drop_database(name)
            await client.close()


    if __name__ == "__main__":
        import asyncio as _asyncio
        import sys as _sys

        _asyncio.run(_readme_check(_sys.argv[1], _sys.argv[2]))
    """
)


def code_blocks(markdown: str) -> list[tuple[str, str]]:
    return re.findall(r"```(\w*)\n(.*?)```", markdown, flags=re.DOTALL)


def commands_of(block: str) -> list[str]:
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_install_comes_first_then_the_example_then_the_two_commands() -> None:
    blocks = code_blocks(README)
    assert commands_of(blocks[0][1]) == ["pip install beanie-tasks"]
    assert blocks[1][0] == "python" and "FastAPI(" in blocks[1][1]
    make = [i for i, (_, block) in enumerate(blocks) if commands_of(block) == ["make demo", "make test"]]
    assert make and make[0] > 1, "the contributors' two commands follow the example"
    assert README.index("pip install beanie-tasks") < README.index("```python") < README.index("make demo")


def test_the_example_is_short() -> None:
    example = code_blocks(README)[1][1]
    lines = [line for line in example.splitlines() if line.strip()]
    assert len(lines) <= 25, f"the README's example has {len(lines)} lines"
    for name in ("class Thumbnail(Task)", ".push(", "Worker([Thumbnail]).in_background()", "init_beanie(database="):
        assert name in example


def test_the_example_runs(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    blocks = [block for kind, block in code_blocks(README) if kind == "python"]
    assert len(blocks) == 1, "the README has one short example"
    example = blocks[0]
    assert example.count(DATABASE_IN_EXAMPLE) == 1, "the harness points the example at its own database"
    assert example.count(URI_IN_EXAMPLE) == 1, "the harness points the example at the test server"
    database = f"bt_readme_{uuid.uuid4().hex[:8]}"
    uri = os.environ.get("MONGODB_URI")
    if not uri:
        server: EmbeddedServer = request.getfixturevalue("secantus")
        uri = server.uri
    script = tmp_path / "readme_example.py"
    program = example.replace(DATABASE_IN_EXAMPLE, f"client[{database!r}]").replace(URI_IN_EXAMPLE, repr(uri))
    script.write_text(program + HARNESS)
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
