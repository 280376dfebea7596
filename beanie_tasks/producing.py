"""What a bulk push reports for each task, and the order that lets tasks of one call link each other.

``Task.push_many`` stores many tasks with one unordered ``insert_many`` per chunk: one
bad task must not cost the others their push, so it answers with one ``PushOutcome``
per task instead of raising. Tasks of the same call may depend on each other; they
are stored dependencies first, one level at a time (``dependency_levels``).
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# Tasks per insert_many: one command each (PyMongo splits only past 100,000 documents or 48 MB).
PUSH_CHUNK = 1000


class PushStatus(str, Enum):
    PUSHED = "pushed"
    """Stored as a new task; ``stored`` is the task itself, now with its id."""
    DUPLICATE = "duplicate"
    """Not stored: its ``dedupe_key`` is held by an in-flight task, which ``stored`` is."""
    REJECTED = "rejected"
    """Not stored: invalid, linking a task it may not, or refused by the server; ``error`` says why."""


@dataclass(frozen=True)
class PushOutcome(Generic[T]):
    """What ``push_many`` did with one task, in the order the tasks were given."""

    task: T
    status: PushStatus
    stored: T | None = None
    error: str | None = None

    @property
    def id(self) -> Any:
        """The id of the stored task (the in-flight twin's for a duplicate); None when rejected."""
        return getattr(self.stored, "id", None)

    @property
    def pushed(self) -> bool:
        return self.status is PushStatus.PUSHED


def dependency_levels(needs: Mapping[int, Set[int]]) -> tuple[list[list[int]], list[int]]:
    """Group positions so that each comes in a later level than every position it links.

    ``needs`` maps a position to the positions of the same call it links. Returns the
    levels, and apart the positions that can never be placed (a cycle, or linking one).
    """
    placed: set[int] = set()
    left = dict(needs)
    levels: list[list[int]] = []
    while left:
        level = sorted(position for position, wanted in left.items() if wanted <= placed)
        if not level:
            break
        levels.append(level)
        placed.update(level)
        for position in level:
            del left[position]
    return levels, sorted(left)
