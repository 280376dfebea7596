"""beanie-tasks: a reliable task queue on MongoDB for Beanie apps."""

from beanie import Link

from beanie_tasks.admin import RequeueReport
from beanie_tasks.batch import Acknowledgement, claim_batch, finish_batch
from beanie_tasks.dependencies import OnFailure, depends_on
from beanie_tasks.errors import LeaseLost, PushError, TaskCancelled, TaskError, TaskFailed, TransitionError, WaitTimeout
from beanie_tasks.options import RateLimit, TaskOptions
from beanie_tasks.producing import PushOutcome, PushStatus
from beanie_tasks.retry import Backoff
from beanie_tasks.schedule import Schedule, ScheduleError, run_schedules
from beanie_tasks.states import DependencyType, Priority, State
from beanie_tasks.task import Task
from beanie_tasks.worker import Worker

__all__ = [
    "Acknowledgement",
    "Backoff",
    "DependencyType",
    "LeaseLost",
    "Link",
    "OnFailure",
    "Priority",
    "PushError",
    "PushOutcome",
    "PushStatus",
    "RateLimit",
    "RequeueReport",
    "Schedule",
    "ScheduleError",
    "State",
    "Task",
    "TaskCancelled",
    "TaskError",
    "TaskFailed",
    "TaskOptions",
    "TransitionError",
    "WaitTimeout",
    "Worker",
    "claim_batch",
    "depends_on",
    "finish_batch",
    "run_schedules",
]
__version__ = "0.1.0"
