"""TaskSettings: resolved at class creation, inherited, validated with clear errors."""

from __future__ import annotations

from datetime import timedelta

import pytest

from beanie_tasks import Backoff, Task, TaskOptions


def test_defaults_keep_seed_semantics() -> None:
    options = Task.task_options
    assert options.max_attempts == 1 and options.ttl is None
    assert options.visibility_timeout == 60.0 and options.lease == timedelta(seconds=60)
    assert options.heartbeat_every == 20.0


def test_nested_task_settings_are_resolved_and_inherited() -> None:
    class Parent(Task):
        class TaskSettings:
            max_attempts = 4
            visibility_timeout = timedelta(seconds=30)
            ttl = 3600

    class Child(Parent):
        class TaskSettings:
            ttl = 60

    assert Parent.task_options.max_attempts == 4
    assert Parent.task_options.visibility_timeout == 30.0
    assert Child.task_options.max_attempts == 4, "unset options are inherited"
    assert Child.task_options.ttl == 60.0
    assert Task.task_options.max_attempts == 1, "the base class is untouched"


def test_unknown_option_names_the_known_ones() -> None:
    with pytest.raises(TypeError, match=r"Unknown TaskSettings option.*max_attempts"):

        class Typo(Task):
            class TaskSettings:
                max_attempt = 3


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_attempts": 0}, ValueError),
        ({"max_attempts": 2.5}, TypeError),
        ({"max_attempts": True}, TypeError),
        ({"visibility_timeout": 0}, ValueError),
        ({"visibility_timeout": -5}, ValueError),
        ({"visibility_timeout": "60"}, TypeError),
        ({"visibility_timeout": None}, TypeError),
        ({"ttl": 0}, ValueError),
        ({"backoff": 5}, TypeError),
        ({"visibility_timeout": 10, "heartbeat_interval": 10}, ValueError),
    ],
)
def test_bad_values_fail_loudly(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error, match="TaskSettings"):
        TaskOptions(**kwargs)  # type: ignore[arg-type]


def test_timedeltas_become_seconds_and_options_are_frozen() -> None:
    options = TaskOptions(ttl=timedelta(days=1), backoff=Backoff(base=2))
    assert options.ttl == 86400.0 and options.backoff.base == 2
    with pytest.raises(AttributeError):
        options.ttl = 5  # type: ignore[misc]


def test_filters_are_checked_at_class_definition() -> None:
    class Network(Task):
        class TaskSettings:
            retry_on = (TimeoutError, ConnectionError)

    class Single(Network):
        class TaskSettings:
            dont_retry_on = KeyError  # one class is accepted as well as a tuple

    assert Network.task_options.retry_on == (TimeoutError, ConnectionError)
    assert Single.task_options.retry_on == (TimeoutError, ConnectionError), "inherited"
    assert Single.task_options.dont_retry_on == (KeyError,)
    with pytest.raises(TypeError, match=r"TaskSettings\.retry_on must be exception classes.*'TimeoutError'"):

        class Bad(Task):
            class TaskSettings:
                retry_on = ("TimeoutError",)

    with pytest.raises(TypeError, match=r"TaskSettings\.dont_retry_on must be exception classes.*int"):
        TaskOptions(dont_retry_on=(KeyError, int))  # type: ignore[arg-type]


def test_the_filter_decision() -> None:
    options = TaskOptions(retry_on=(OSError,), dont_retry_on=(FileNotFoundError,))
    assert options.retries(ConnectionError()) and not options.retries(ValueError())
    assert not options.retries(FileNotFoundError()), "dont_retry_on is checked first"
    assert options.retries("a message names no type: retried as before") and TaskOptions().retries(ValueError())
