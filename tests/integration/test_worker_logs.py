"""One log line per outcome, the traceback kept on a failed task, and the log set-up of a worker process."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest

from beanie_tasks import Backoff, State, Task, Worker, logs
from beanie_tasks.task import MAX_TRACEBACK
from beanie_tasks.testing import eventually, running

FAST = Backoff(base=0.05, jitter=0.0)


class LogFinishes(Task):
    async def run(self) -> str:
        return "done"


class LogRetries(Task):
    class TaskSettings:
        max_attempts = 2
        backoff = FAST

    async def run(self) -> str:
        if self.attempts == 1:
            raise ConnectionResetError("upstream hung up")
        return "second time lucky"


class LogFailsForGood(Task):
    def run(self) -> None:
        checksum_of_nothing()


class LogHugeError(Task):
    async def run(self) -> None:
        raise ValueError("x" * 50_000)


class LogLeaky(Task):
    async def run(self) -> None:
        raise ConnectionError("cannot reach mongodb://billing:Pa55word@db.internal:27017/app")


def checksum_of_nothing() -> None:
    raise ZeroDivisionError("the file was empty")


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(LogFinishes, LogRetries, LogFailsForGood, LogHugeError, LogLeaky)


async def ended(task_class: type[Task], task_id: Any) -> Task | None:
    stored = await task_class.get(task_id)
    return stored if stored is not None and stored.state.is_terminal else None


def lines_about(caplog: pytest.LogCaptureFixture, task: Task) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("beanie_tasks") and str(task.id) in r.getMessage()]


async def test_a_finished_task_is_one_info_line_with_class_id_attempt_and_duration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="beanie_tasks")
    pushed = await LogFinishes().push()
    async with running(Worker([LogFinishes])):
        await eventually(lambda: ended(LogFinishes, pushed.id))
    [line] = lines_about(caplog, pushed)
    assert line.levelno == logging.INFO
    assert line.getMessage().startswith(f"LogFinishes {pushed.id} finished (attempt 1, ")
    assert (line.task_class, line.task_id, line.attempt) == ("LogFinishes", str(pushed.id), 1)  # type: ignore[attr-defined]
    assert line.duration >= 0  # type: ignore[attr-defined]


async def test_a_retry_is_a_warning_with_the_exception_and_the_final_failure_an_error_with_the_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="beanie_tasks")
    retried = await LogRetries().push()
    doomed = await LogFailsForGood().push()
    async with running(Worker([LogRetries, LogFailsForGood])):
        await eventually(lambda: ended(LogRetries, retried.id))
        failed = await eventually(lambda: ended(LogFailsForGood, doomed.id))

    warning, finished = lines_about(caplog, retried)
    assert warning.levelno == logging.WARNING and warning.exc_info is None
    assert "failed (attempt 1 of 2" in warning.getMessage()
    assert "will retry: ConnectionResetError: upstream hung up" in warning.getMessage()
    assert finished.levelno == logging.INFO and "finished (attempt 2" in finished.getMessage()

    [error] = lines_about(caplog, doomed)
    assert error.levelno == logging.ERROR
    assert "failed for good (attempt 1 of 1" in error.getMessage()
    assert error.exc_info is not None and error.exc_info[0] is ZeroDivisionError

    # The same traceback is kept on the task, written by the failing update itself.
    assert failed.state is State.FAILED and failed.error == "ZeroDivisionError: the file was empty"
    assert failed.traceback is not None
    assert "in checksum_of_nothing" in failed.traceback
    assert failed.traceback.rstrip().endswith("ZeroDivisionError: the file was empty")


async def test_the_traceback_on_the_task_is_cut_to_its_end() -> None:
    pushed = await LogHugeError().push()
    async with running(Worker([LogHugeError])):
        failed = await eventually(lambda: ended(LogHugeError, pushed.id))
    assert failed.traceback is not None and len(failed.traceback) <= MAX_TRACEBACK + 4
    assert failed.traceback.startswith("...\n") and failed.traceback.endswith("x\n")


async def test_no_credential_reaches_the_log_line_or_the_stored_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="beanie_tasks")
    pushed = await LogLeaky().push()
    async with running(Worker([LogLeaky])):
        failed = await eventually(lambda: ended(LogLeaky, pushed.id))
    [line] = lines_about(caplog, pushed)
    shown = logging.Formatter().format(line) + caplog.text
    assert "mongodb://***@db.internal:27017/app" in line.getMessage()
    assert "Pa55word" not in shown and "billing" not in shown
    assert failed.traceback is not None and "mongodb://***@db.internal" in failed.traceback
    assert "Pa55word" not in failed.traceback


async def test_a_retry_keeps_the_traceback_of_the_failed_attempt() -> None:
    pushed = await LogRetries().push()
    await (await LogRetries.pop()).fail(RuntimeError("first try"))  # type: ignore[union-attr]
    stored = await LogRetries.get(pushed.id)
    assert stored is not None and stored.state is State.CREATED and stored.traceback is None  # no __traceback__
    try:
        raise RuntimeError("raised for real")
    except RuntimeError as exc:
        error = exc
    claimed = await eventually(LogRetries.pop)
    await claimed.fail(error)
    stored = await LogRetries.get(pushed.id)
    assert stored is not None and stored.traceback is not None and "raised for real" in stored.traceback


# ------------------------------------------------------------ log set-up


@pytest.fixture
def restore_logging() -> Any:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("beanie_tasks", "pymongo", "motor")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, saved in levels.items():
        logging.getLogger(name).setLevel(saved)


def test_log_level_sets_the_librarys_loggers_and_the_driver_stays_at_warning(restore_logging: Any) -> None:
    stream = io.StringIO()
    logs.configure("DEBUG", stream=stream)
    logging.getLogger("beanie_tasks.worker").debug("ours at debug")
    logging.getLogger("pymongo.command").debug("a driver command log")
    logging.getLogger("pymongo.command").warning("a driver warning")
    logging.getLogger("somelib").info("another library's info")
    lines = stream.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["ours at debug", "a driver warning"]

    logs.configure("WARNING", driver_level="DEBUG", stream=stream)
    logging.getLogger("pymongo.command").debug("now the driver too")
    logging.getLogger("beanie_tasks.worker").info("ours at info is hidden")
    assert stream.getvalue().splitlines()[-1].endswith("now the driver too")


def test_json_lines_carry_the_task_fields_and_the_traceback_and_never_a_credential(restore_logging: Any) -> None:
    stream = io.StringIO()
    logs.configure("INFO", fmt="json", secrets=["hunter2"], stream=stream)
    log = logging.getLogger("beanie_tasks.worker")
    log.info("Email 1 finished", extra={"task_class": "Email", "task_id": "1", "attempt": 2, "duration": 0.5})
    try:
        raise OSError("cannot reach mongodb://admin:hunter2@db.internal/app")
    except OSError:
        log.exception("lost mongodb://admin:hunter2@db.internal/app, password hunter2")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "INFO" and first["logger"] == "beanie_tasks.worker"
    assert (first["task_class"], first["task_id"], first["attempt"], first["duration"]) == ("Email", "1", 2, 0.5)
    assert second["level"] == "ERROR" and "OSError" in second["traceback"]
    assert "hunter2" not in stream.getvalue() and "admin" not in stream.getvalue()
    assert "mongodb://***@db.internal/app" in second["message"]


def test_bad_levels_and_formats_are_one_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown log level 'LOUD'; use DEBUG, INFO, WARNING, ERROR"):
        logs.parse_level("LOUD")
    with pytest.raises(ValueError, match="unknown log format 'xml'; use text or json"):
        logs.configure("INFO", fmt="xml")
