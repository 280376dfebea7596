"""beanie-tasks: a reliable task queue on MongoDB for Beanie apps."""

from beanie_tasks.errors import LeaseLost, PushError, TaskCancelled, TaskError, TaskFailed, TransitionError, WaitTimeout
from beanie_tasks.options import TaskOptions
from beanie_tasks.retry import Backoff
from beanie_tasks.states import DependencyType, Priority, State
from beanie_tasks.task import Task

__all__ = [
    "Backoff",
    "DependencyType",
    "LeaseLost",
    "Priority",
    "PushError",
    "State",
    "Task",
    "TaskCancelled",
    "TaskError",
    "TaskFailed",
    "TaskOptions",
    "TransitionError",
    "WaitTimeout",
]
__version__ = "0.1.0"
