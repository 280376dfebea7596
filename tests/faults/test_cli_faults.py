"""The CLI fails fast and clearly on a bad URI, an unreachable server or an unknown module; no password printed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from beanie_tasks.embedded import free_port

PASSWORD = "pw-s3cr%23t"
HELPERS = Path(__file__).resolve().parent / "helpers"


def cli(*args: str, timeout: float = 60) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", "from beanie_tasks.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=os.environ | {"PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])},
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def test_unreachable_server_fails_fast_without_printing_the_password() -> None:
    uri = f"mongodb://alice:{PASSWORD}@127.0.0.1:{free_port()}/app"
    code, output, took = cli("worker", "fault_tasks", "--uri", uri, "--timeout", "1")
    assert code != 0 and "cannot reach" in output
    assert PASSWORD not in output and "pw-s3cr#t" not in output and "***@127.0.0.1" in output
    assert took < 30


# A password with an unencoded '@', as people paste it: "S3c@retPw6".
AT_PASSWORD_URI = "mongodb://user:S3c@retPw6@127.0.0.1:1/db"


@pytest.mark.parametrize("via", ["--uri", "MONGODB_URI"])
@pytest.mark.parametrize("command", [["status", "-m", "fault_tasks"], ["worker", "fault_tasks"]])
def test_a_password_with_an_at_sign_never_reaches_the_output(command: list[str], via: str) -> None:
    """``python -m beanie_tasks.cli ...`` as typed in a shell: neither half of the password is printed."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])}
    args = [*command, "--timeout", "1"]
    if via == "--uri":
        args += ["--uri", AT_PASSWORD_URI]
    else:
        env["MONGODB_URI"] = AT_PASSWORD_URI
    done = subprocess.run(
        [sys.executable, "-m", "beanie_tasks.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == 1 and done.stderr.startswith("error: ")
    for stream in (done.stdout, done.stderr):
        assert "S3c" not in stream and "retPw6" not in stream, stream
    assert "mongodb://***@127.0.0.1:1/db" in done.stderr


def test_bad_uri_is_reported_without_the_password() -> None:
    code, output, _ = cli("worker", "fault_tasks", "--uri", f"mongodb://alice:{PASSWORD}@db.example.com:notaport/app")
    assert code != 0 and "URI" in output
    assert PASSWORD not in output


def test_unknown_module_is_reported(secantus: object) -> None:
    uri = secantus.uri  # type: ignore[attr-defined]
    code, output, _ = cli("worker", "no_such_module_for_beanie_tasks", "--uri", uri, "--database", "bt_cli_faults")
    assert code != 0 and "no_such_module_for_beanie_tasks" in output


@pytest.mark.parametrize("command", [["worker", "fault_tasks"]])
def test_missing_uri_is_reported(command: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MONGODB_URI", raising=False)
    code, output, _ = cli(*command)
    assert code != 0 and "URI" in output
