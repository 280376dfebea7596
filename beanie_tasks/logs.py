"""Log set-up for a worker process: levels per logger family, text or JSON lines, always redacted.

``--log-level`` is about this library's own lines, so it sets the ``beanie_tasks``
loggers only; the driver's loggers (``pymongo``, ``motor``) log every command at DEBUG
and stay at WARNING unless asked for. Every line goes through ``redact``'s policy, so no
MongoDB credential reaches a log, whatever the format.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import IO, Any

from beanie_tasks.redact import get_logger, scrub

LIBRARY_LOGGER = "beanie_tasks"
# The CLI's own lines for the operator, when logs are JSON.
cli_log = get_logger("beanie_tasks.cli")
DRIVER_LOGGERS = ("pymongo", "motor")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Fields a task's log line carries as ``extra``: JSON lines show them as their own keys.
TASK_FIELDS = ("task_class", "task_id", "attempt", "duration", "outcome", "consumer_id")
# The attributes every LogRecord has; anything else on a record was passed as ``extra``.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def parse_level(name: str) -> int:
    """``"info"`` -> ``logging.INFO``; a ValueError naming the choices for anything else."""
    level = logging.getLevelName(name.upper())
    if name.upper() not in LEVELS or not isinstance(level, int):
        raise ValueError(f"unknown log level {name!r}; use {', '.join(LEVELS)}")
    return level


class RedactingFormatter(logging.Formatter):
    """Text lines with credentials (any URI's userinfo, and ``secrets``) masked."""

    def __init__(self, fmt: str = TEXT_FORMAT, secrets: Sequence[str] = ()) -> None:
        super().__init__(fmt)
        self.secrets = list(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record), self.secrets)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the task fields, and the traceback."""

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        super().__init__()
        self.secrets = list(secrets)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            entry["traceback"] = record.exc_text or self.formatException(record.exc_info)
        elif record.exc_text:
            entry["traceback"] = record.exc_text
        return scrub(json.dumps(entry, default=str), self.secrets)


def configure(
    level: int | str = logging.INFO,
    *,
    driver_level: int | str = logging.WARNING,
    fmt: str = "text",
    secrets: Sequence[str] = (),
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Send log lines to ``stream`` (stderr): ``beanie_tasks`` at ``level``, the driver at ``driver_level``.

    The root logger keeps WARNING, so other libraries stay as quiet as Python's default.
    Returns the handler installed on the root logger (it replaces any there).
    """
    level = parse_level(level) if isinstance(level, str) else level
    driver_level = parse_level(driver_level) if isinstance(driver_level, str) else driver_level
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; use {' or '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(secrets) if fmt == "json" else RedactingFormatter(secrets=secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger(LIBRARY_LOGGER).setLevel(level)
    for name in DRIVER_LOGGERS:
        logging.getLogger(name).setLevel(driver_level)
    return handler
