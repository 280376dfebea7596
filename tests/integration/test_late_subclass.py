"""A Task subclass defined after init_beanie ran (plugins, notebooks) still gets real defaults."""

from __future__ import annotations

from typing import Any

from beanie_tasks import Priority, State, Task


class EarlyTask(Task):
    n: int = 0


async def test_subclass_defined_after_init_beanie_has_real_defaults(init_tasks: Any) -> None:
    await init_tasks(EarlyTask)

    class LateTask(Task):
        label: str = "x"

    class LaterStill(LateTask):
        extra: int = 1

    for cls in (LateTask, LaterStill):
        fresh = cls()
        assert fresh.id is None
        assert fresh.state is State.CREATED
        assert fresh.priority == Priority.MEDIUM
        assert fresh.attempts == 0

    await init_tasks(EarlyTask, LateTask, LaterStill)
    pushed = await LaterStill(extra=5).push()
    popped = await LaterStill.pop()
    assert popped is not None and popped.id == pushed.id and popped.extra == 5
