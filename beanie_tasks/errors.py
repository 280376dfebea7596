"""Exceptions a caller can catch; everything the library raises on purpose is here."""

from __future__ import annotations


class TaskError(Exception):
    """Base class of the library's own errors."""


class TransitionError(TaskError):
    """The task is not in a state that allows the requested transition."""


class LeaseLost(TransitionError):
    """This consumer no longer holds the task's lease; nothing was written."""


class TaskCancelled(LeaseLost):
    """The task was cancelled while this consumer held it."""


class PushError(TaskError):
    """A push could not be stored; the task was not written."""


class WaitTimeout(TaskError, TimeoutError):
    """``Task.wait`` gave up before the task reached a terminal state."""


class TaskFailed(TaskError):
    """``Task.wait`` saw the task end FAILED or CANCELLED."""

    def __init__(self, message: str, task: object) -> None:
        super().__init__(message)
        self.task = task
