"""An embedded server lives no longer than the process that started it, and a port already
taken is named in the error instead of "exited with code 1".

A ``dev-server`` or a test run killed with SIGKILL cannot stop its server; the server then
kept the port (and the data directory) until someone found and killed it by hand, and the
next ``dev-server`` on that port failed with a bare exit code.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from beanie_tasks.embedded import EmbeddedServer, EmbeddedServerError, free_port

pytestmark = pytest.mark.wire

OWNER = textwrap.dedent(
    """
    import sys, time

    from beanie_tasks.embedded import EmbeddedServer

    server = EmbeddedServer(port=int(sys.argv[1]), storage_path=sys.argv[2]).start()
    print("listening", flush=True)
    time.sleep(600)
    """
)


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_the_server_stops_when_the_process_that_started_it_is_killed(tmp_path: Path) -> None:
    port = free_port()
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(port), str(tmp_path / "data")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "listening"
        assert listening(port)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 15
        while listening(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not listening(port), "the server outlived the process that started it"
    finally:
        if owner.poll() is None:
            owner.kill()
    # The same port and data directory can be used again at once.
    with EmbeddedServer(port=port, storage_path=str(tmp_path / "data")):
        assert listening(port)


def test_a_port_in_use_is_named_in_the_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(EmbeddedServerError, match=rf"port {port} on 127\.0\.0\.1 is already in use"):
            EmbeddedServer(port=port).start()
        assert time.monotonic() - started < 5, "a taken port fails at once"


def test_a_server_that_exits_at_start_says_why(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the data directory should be\n")
    with pytest.raises(EmbeddedServerError, match=r"exited with code \d+ on port \d+: \S"):
        EmbeddedServer(storage_path=str(blocker / "data")).start()
