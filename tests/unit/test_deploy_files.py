"""The deployment files of docs/deploy.md parse, and every supervisor outwaits the worker's drain.

A supervisor that SIGKILLs sooner than ``--grace-period`` plus the release of what is left
cuts the drain short; these checks keep the files honest when either number changes.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from beanie_tasks.cli import app
from beanie_tasks.worker import RELEASE_TIMEOUT

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy"
DEFAULT_GRACE = 30.0
NOT_YET_IN_THIS_CLI = "--metrics-port"


def worker_options() -> set[str]:
    command: Any = typer.main.get_command(app)
    worker = command.commands["worker"]
    return {name for param in worker.params for name in getattr(param, "opts", []) if name.startswith("-")}


def grace_of(argv: list[str]) -> float:
    return float(argv[argv.index("--grace-period") + 1]) if "--grace-period" in argv else DEFAULT_GRACE


def drain_time(argv: list[str]) -> float:
    """The longest a worker started with ``argv`` takes to stop after SIGTERM."""
    return grace_of(argv) + RELEASE_TIMEOUT


def seconds(value: str | int) -> float:
    match = re.fullmatch(r"(\d+)(s|m)?", str(value))
    assert match, f"not a duration: {value!r}"
    return float(match.group(1)) * (60 if match.group(2) == "m" else 1)


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "beanie-tasks-worker.service").read_text())
    return parser


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def kubernetes() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if doc]


def worker_commands() -> list[list[str]]:
    service = unit()["Service"]
    k8s = kubernetes()[0]["spec"]["template"]["spec"]["containers"][0]
    return [
        shlex.split(service["ExecStart"])[1:],
        compose()["services"]["worker"]["command"][1:],
        [*k8s["command"][1:], *k8s["args"]],
    ]


def test_the_systemd_unit_outwaits_the_drain() -> None:
    service = unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/beanie-tasks") and argv[1] == "worker"
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    assert seconds(service["TimeoutStopSec"]) > drain_time(argv)
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_compose_runs_app_workers_and_a_replica_set() -> None:
    services = compose()["services"]
    assert set(services) == {"mongo", "app", "worker"}
    assert "--replSet" in services["mongo"]["command"]
    for name in ("app", "worker"):
        assert "replicaSet=" in services[name]["environment"]["MONGODB_URI"]
        assert services[name]["depends_on"]["mongo"]["condition"] == "service_healthy"
    worker = services["worker"]
    assert seconds(worker["stop_grace_period"]) > drain_time(worker["command"])
    assert "/healthz" in " ".join(worker["healthcheck"]["test"])


def test_the_kubernetes_deployment_outwaits_the_drain_and_probes_healthz() -> None:
    (deployment,) = kubernetes()
    assert deployment["kind"] == "Deployment" and deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = [*container["command"], *container["args"]]
    assert pod["terminationGracePeriodSeconds"] > drain_time(argv)
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    port = next(p for p in container["ports"] if p["name"] == probe["port"])
    assert str(port["containerPort"]) == argv[argv.index("--metrics-port") + 1]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_the_dockerfile_runs_its_command_as_pid_1() -> None:
    lines = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0].startswith("FROM python:")
    (cmd,) = [line for line in lines if line.startswith("CMD ")]
    assert json.loads(cmd.removeprefix("CMD "))[0] == "uvicorn"  # exec form: SIGTERM reaches the process
    assert any(line.startswith("USER ") for line in lines)


def test_every_worker_command_uses_options_the_cli_has() -> None:
    known = worker_options() | {NOT_YET_IN_THIS_CLI}
    for argv in worker_commands():
        assert argv[:2] == ["worker", "myapp.tasks"], argv
        assert {arg for arg in argv if arg.startswith("-")} <= known, argv


def test_the_metrics_port_option_exists() -> None:
    if NOT_YET_IN_THIS_CLI not in worker_options():
        pytest.skip("the worker CLI has no --metrics-port yet (observability lands separately)")
