"""Fixtures for the fault suite: consumer subprocesses and failpoints (helpers live in helpers/)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

from faultkit import Consumers, FailPoints

from beanie_tasks.driver import close_client


@pytest.fixture
def consumers(tmp_path: Path) -> Iterator[Consumers]:
    started = Consumers(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture
async def failpoints(backend: Any) -> AsyncIterator[FailPoints]:
    client = backend.client()
    points = FailPoints(client)
    try:
        await points.disarm()
    except Exception as exc:  # a real mongod without enableTestCommands
        await close_client(client)
        pytest.skip(f"configureFailPoint is not available on this server: {type(exc).__name__}")
    try:
        yield points
    finally:
        await points.disarm()
        await close_client(client)
