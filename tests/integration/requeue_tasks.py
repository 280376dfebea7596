"""Task classes of the requeue tests, importable by name so the CLI can be run on them in a subprocess."""

from __future__ import annotations

from beanie import Link

from beanie_tasks import DependencyType, Task, depends_on


class Render(Task):
    """A root task: what the dependents below wait for."""

    name: str


class Check(Task):
    name: str


class Upload(Task):
    render: Link[Render] = depends_on(DependencyType.DIRECT)


class Notify(Task):
    upload: Link[Upload] = depends_on(DependencyType.DIRECT)


class Digest(Task):
    renders: list[Link[Render]] = depends_on(DependencyType.ALL_OF, default_factory=list)
    check: Link[Check] | None = depends_on(DependencyType.DIRECT, default=None)


MODELS = (Render, Check, Upload, Notify, Digest)
