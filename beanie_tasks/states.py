"""The vocabularies shared by every task: lifecycle states, priorities, link kinds."""

from __future__ import annotations

from enum import Enum, IntEnum
from typing import Any


class State(str, Enum):
    CREATED = "CREATED"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({State.FINISHED, State.FAILED, State.CANCELLED})
IN_FLIGHT_STATES = frozenset({State.CREATED, State.RUNNING})


class Priority(IntEnum):
    """Named priorities; any integer in ``PRIORITY_RANGE`` is accepted too."""

    LOW = 1
    MEDIUM = 2
    HIGH = 3


PRIORITY_RANGE = (0, 100)


class DependencyType(str, Enum):
    DIRECT = "DIRECT"
    ALL_OF = "ALL_OF"
    ANY_OF = "ANY_OF"


def state_value(stored: Any) -> str:
    """A stored state as its plain string (mongomock hands back the enum it was given)."""
    return stored.value if isinstance(stored, Enum) else str(stored)
