"""`make demo` installs only what the demo needs: the library and the embedded server, no dev tools."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEV_TOOLS = ("pytest", "mypy", "ruff", "matplotlib", "mkdocs", "hypothesis", "fastapi", "httpx")


def extra(name: str) -> list[str]:
    pyproject = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf"^{name} = \[(.*?)\]", pyproject, flags=re.MULTILINE | re.DOTALL)
    assert match, f"no [{name}] extra in pyproject.toml"
    return re.findall(r'"([^"]+)"', match.group(1))


def test_the_demo_extra_is_the_embedded_server_only() -> None:
    wanted = extra("demo")
    assert [re.split(r"[<>=\[]", requirement)[0] for requirement in wanted] == ["secantusdb"]
    assert wanted == extra("server")


def test_make_demo_installs_the_demo_extra_into_its_own_venv() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    plan = subprocess.run(
        ["make", "--no-print-directory", "--always-make", "--dry-run", "demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installs = [line for line in plan.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert len(installs) == 1, plan
    assert "-e '.[demo]'" in installs[0] and "dev" not in installs[0] and "bench" not in installs[0], installs
    assert plan.splitlines()[-1].endswith("-m beanie_tasks.demo"), plan
    venv = installs[0].split("/bin/python")[0]
    assert plan.splitlines()[-1].startswith(f"{venv}/bin/python"), "the demo runs in the venv it installed"


def test_the_demo_imports_no_dev_tool() -> None:
    probe = "import json, sys, beanie_tasks.demo; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, check=True).stdout)
    assert not [name for name in loaded if name.split(".")[0] in DEV_TOOLS]
