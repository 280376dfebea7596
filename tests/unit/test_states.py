"""The public vocabularies: names and values that users and stored documents rely on."""

from __future__ import annotations

import beanie_tasks
from beanie_tasks import DependencyType, Priority, State
from beanie_tasks.states import IN_FLIGHT_STATES, PRIORITY_RANGE, TERMINAL_STATES


def test_public_names_are_importable() -> None:
    for name in ("Task", "State", "Priority", "DependencyType", "LeaseLost", "Backoff"):
        assert hasattr(beanie_tasks, name)


def test_states_are_stored_as_their_names() -> None:
    assert [s.value for s in State] == ["CREATED", "RUNNING", "FINISHED", "FAILED", "CANCELLED"]
    assert State("FAILED") is State.FAILED


def test_in_flight_and_terminal_split_the_states() -> None:
    assert {State.CREATED, State.RUNNING} == IN_FLIGHT_STATES
    assert {State.FINISHED, State.FAILED, State.CANCELLED} == TERMINAL_STATES
    assert set(State) == IN_FLIGHT_STATES | TERMINAL_STATES
    assert all(s.is_terminal for s in TERMINAL_STATES) and not any(s.is_terminal for s in IN_FLIGHT_STATES)


def test_priorities_order_low_to_high_and_fit_the_allowed_range() -> None:
    assert Priority.LOW < Priority.MEDIUM < Priority.HIGH
    low, high = PRIORITY_RANGE
    assert all(low <= p <= high for p in Priority)


def test_dependency_types() -> None:
    assert {d.value for d in DependencyType} == {"DIRECT", "ALL_OF", "ANY_OF"}
