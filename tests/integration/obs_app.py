"""A user's module for the CLI observability test: task classes, an app model they write, a setup hook."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from beanie import Document

from beanie_tasks import Backoff, Task

log = logging.getLogger("beanie_tasks.obs_app")


class ObsSignup(Document):
    """An ordinary app model: the CLI registers it because this module defines it."""

    email: str


class ObsWelcome(Task):
    email: str

    async def run(self) -> str:
        await ObsSignup(email=self.email).insert()
        return "welcomed"


class ObsFlaky(Task):
    class TaskSettings:
        max_attempts = 2
        backoff = Backoff(base=0.05, jitter=0.0)

    def run(self) -> str:
        if self.attempts == 1:
            raise TimeoutError("smtp did not answer")
        return "second time"


class ObsDoomed(Task):
    async def run(self) -> None:
        raise LookupError("no such template: welcome.html")


async def setup(worker: Any) -> AsyncIterator[None]:
    log.warning("setup hook ran for %d classes", len(worker.task_classes))
    yield
    log.warning("setup hook closed")


def broken_setup(worker: Any) -> None:
    raise RuntimeError("cannot open mongodb://reporting:s3cret@reports.internal/app")


NOT_CALLABLE = 42
