"""Start a throw-away SecantusDB server (the ``server`` extra) for demos, local work and tests.

SecantusDB is GPL-2.0 and runs as a separate process reached over TCP; it is never
imported, and it is not a runtime dependency of beanie-tasks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SERVER_COMMAND = "secantusd-py"
MEMORY = ":memory:"


class EmbeddedServerError(RuntimeError):
    """The embedded server could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (a server left running, another program)."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def server_executable() -> str:
    beside_python = Path(sys.executable).with_name(SERVER_COMMAND)
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(SERVER_COMMAND)
    if found is None:
        raise EmbeddedServerError(
            f"{SERVER_COMMAND} not found: install the embedded server with "
            "pip install 'beanie-tasks[server]' (SecantusDB, GPL-2.0), or set MONGODB_URI"
        )
    return found


# The server is started through this shim when its package is importable here, for two reasons:
# - secantusdb 0.7.0b3 reads ``[storage] ttl_sweep_seconds`` from its config file but never
#   hands it to the server, so expiry would only run every 60s: the shim passes it explicitly;
# - the server runs in a session of its own (a Ctrl-C meant for the app does not reach it),
#   so nothing would stop it if its owner were killed with SIGKILL: the shim stops it
#   (SIGTERM, a clean shutdown) once the process that started it is gone.
_SERVER_SHIM = (
    "import functools, os, signal, sys, threading, time\n"
    "from secantus import cli\n"
    "owner = int(sys.argv.pop(1))\n"
    "sweep = float(sys.argv.pop(1))\n"
    "def follow_owner():\n"
    "    while os.getppid() == owner:\n"
    "        time.sleep(0.5)\n"
    "    os.kill(os.getpid(), signal.SIGTERM)\n"
    "threading.Thread(target=follow_owner, daemon=True).start()\n"
    "cli.SecantusDBServer = functools.partial(cli.SecantusDBServer, ttl_sweep_seconds=sweep)\n"
    "sys.exit(cli.main())\n"
)


def server_launcher(ttl_sweep_seconds: float) -> list[str]:
    """The command that starts the server, before its options."""
    executable = server_executable()
    if importlib.util.find_spec("secantus") is None:
        return [executable]
    return [sys.executable, "-c", _SERVER_SHIM, str(os.getpid()), str(float(ttl_sweep_seconds))]


@dataclass
class EmbeddedServer:
    """One ``secantusd-py`` process on 127.0.0.1.

    ``storage_path=None`` (or ``":memory:"``) keeps data in memory; a path keeps it across
    restarts, which the fault tests use to stop and start the same server.

    ``durable`` starts the server with ``--sync-on-commit``: every write is synced to its
    log before it is acknowledged, so an acknowledged write survives a SIGKILL, at the cost
    of slower writes (without it, writes acknowledged milliseconds before a kill are lost).
    ``None``, the default, means durable exactly when the data is on disk; ``:memory:``
    keeps nothing across a stop anyway, so it stays fast.
    """

    port: int = field(default_factory=free_port)
    storage_path: str | None = None
    host: str = "127.0.0.1"
    ttl_sweep_seconds: float = 60.0
    enable_test_commands: bool = False
    durable: bool | None = None
    log_path: str | None = None
    process: subprocess.Popen[bytes] | None = None
    command: list[str] = field(default_factory=list, init=False, repr=False)  # what start() last ran
    _config_dir: str | None = None

    @property
    def in_memory(self) -> bool:
        return self.storage_path in (None, MEMORY)

    @property
    def syncs_on_commit(self) -> bool:
        """Whether the server is (to be) started with ``--sync-on-commit``."""
        return not self.in_memory if self.durable is None else self.durable

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    def start(self, timeout: float = 30.0) -> EmbeddedServer:
        if self.process is not None and self.process.poll() is None:
            return self
        if port_in_use(self.host, self.port):
            # Checked first: a start would otherwise take the other listener for this server.
            raise EmbeddedServerError(
                f"port {self.port} on {self.host} is already in use (a server still running there?); "
                "stop it or choose another port"
            )
        self._config_dir = self._config_dir or tempfile.mkdtemp(prefix="beanie-tasks-server-")
        config = Path(self._config_dir, "secantusd.toml")
        config.write_text(f"[storage]\nttl_sweep_seconds = {self.ttl_sweep_seconds}\n")
        command = [
            *server_launcher(self.ttl_sweep_seconds),
            "--config", str(config),
            "--host", self.host,
            "--port", str(self.port),
            "--storage-path", self.storage_path or MEMORY,
            "--log-level", "WARNING",
        ]  # fmt: skip
        if self.enable_test_commands:
            command.append("--enable-test-commands")
        if self.syncs_on_commit:
            command.append("--sync-on-commit")
        self.command = command
        log = open(self._output_path(), "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        log.close()
        self._wait_until_listening(timeout)
        return self

    def _wait_until_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                said = self._last_log_line()
                raise EmbeddedServerError(
                    f"{SERVER_COMMAND} exited with code {self.process.returncode} on port {self.port}"
                    + (f": {said}" if said else "")
                )
            if port_in_use(self.host, self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise EmbeddedServerError(f"{SERVER_COMMAND} did not listen on port {self.port} within {timeout:.0f}s")

    def _output_path(self) -> Path:
        """Where the server's output goes: ``log_path``, else its config directory (for ``_last_log_line``)."""
        assert self._config_dir is not None
        return Path(self.log_path or Path(self._config_dir, "server.log"))

    def _last_log_line(self) -> str:
        """The server's last line of output (why it exited), if it wrote one."""
        try:
            lines = self._output_path().read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return next((line.strip() for line in reversed(lines) if line.strip()), "")

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout)

    def close(self) -> None:
        self.stop()
        if self._config_dir is not None:
            shutil.rmtree(self._config_dir, ignore_errors=True)
            self._config_dir = None

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def embedded_server(**options: object) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(**options).start() as server:  # type: ignore[arg-type]
        yield server


@contextlib.contextmanager
def server_uri() -> Iterator[str]:
    """``MONGODB_URI`` when set, else the URI of an embedded server that lives for the block."""
    configured = os.environ.get("MONGODB_URI")
    if configured:
        yield configured
        return
    with EmbeddedServer() as server:
        yield server.uri
