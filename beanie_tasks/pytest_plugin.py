"""The ``beanie_tasks`` pytest plugin: the fixtures of ``beanie_tasks.testing``, with no import in ``conftest.py``.

Installing beanie-tasks registers it (a ``pytest11`` entry point); ``-p no:beanie_tasks``
turns it off. Without pytest-asyncio it offers nothing, so installing beanie-tasks never
breaks an unrelated pytest run.
"""

from __future__ import annotations

import importlib.util

import pytest

MODELS_HELP = "modules whose Task classes the task_database fixture passes to init_beanie (e.g. myapp.tasks)"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("beanie_tasks_models", MODELS_HELP, type="args", default=[])


if importlib.util.find_spec("pytest_asyncio") is not None:
    from beanie_tasks.testing import (
        mongodb_uri,
        task_database,
        task_database_in_class_loop,
        task_database_in_function_loop,
        task_database_in_module_loop,
        task_database_in_package_loop,
        task_database_in_session_loop,
        task_models,
    )

    __all__ = [
        "mongodb_uri",
        "task_database",
        "task_database_in_class_loop",
        "task_database_in_function_loop",
        "task_database_in_module_loop",
        "task_database_in_package_loop",
        "task_database_in_session_loop",
        "task_models",
    ]
