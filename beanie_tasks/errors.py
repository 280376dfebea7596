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
    """A push could not be stored, or its outcome is unknown.

    Bad input (a payload over 16 MB, a link to a missing task) means nothing was written.
    A lost connection or another server error means the task may or may not be stored:
    calling ``push()`` again on the same object is safe, it reuses the task's id and is
    never stored twice.
    """


class WaitTimeout(TaskError, TimeoutError):
    """``Task.wait`` gave up before the task reached a terminal state."""


class TaskFailed(TaskError):
    """``Task.wait`` saw the task end FAILED or CANCELLED."""

    def __init__(self, message: str, task: object) -> None:
        super().__init__(message)
        self.task = task


class NotRegistered(TaskError):
    """A task class was used before ``init_beanie`` registered it in this process, or registered badly."""


class ModelNotInitialized(TaskError):
    """run() used a Beanie model that ``init_beanie`` never initialised in the worker process."""


class HookError(TaskError):
    """A worker's startup hook raised; the worker did not start."""


class NotConfigured(TaskError):
    """``beanie_tasks.sync`` was used before ``init()``, or ``init()`` was given settings it cannot use."""
