"""Find the task classes a worker or the CLI may use: only those in modules the operator names.

Module names come from the command line or code, never from the database: a document
that names a class can only ever select among classes imported here.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from types import ModuleType
from typing import Any

from beanie import Document

from beanie_tasks.task import Task


class DiscoveryError(LookupError):
    """A module could not be imported, holds no task classes, or a class name is unknown."""


def import_modules(names: Iterable[str], *, add_cwd: bool = True) -> list[ModuleType]:
    """Import each dotted module name; errors say which module failed and why.

    ``add_cwd`` puts the current directory on ``sys.path`` first, as ``python -m`` does,
    so ``beanie-tasks worker myapp.tasks`` works from the project's root.
    """
    if add_cwd and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    modules = []
    for name in names:
        if name.endswith(".py") or os.sep in name:
            raise DiscoveryError(f"{name!r} looks like a file path; pass a module name such as myapp.tasks")
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name is not None and (name == exc.name or name.startswith(f"{exc.name}.")):
                raise DiscoveryError(f"no module named {name!r} (is it on PYTHONPATH?)") from None
            raise DiscoveryError(f"module {name!r} failed to import: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # the user's module raised while importing: say which one
            raise DiscoveryError(f"module {name!r} failed to import: {type(exc).__name__}: {exc}") from exc
    return modules


def task_classes_in(modules: Sequence[ModuleType]) -> list[type[Task]]:
    """Every ``Task`` subclass reachable as a module attribute, each once, in module order."""
    found: dict[type[Task], None] = {}
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Task) and value is not Task:
                found.setdefault(value)
    return list(found)


def discover(names: Sequence[str]) -> list[type[Task]]:
    """Import ``names`` and return their task classes; at least one module and one class are required."""
    if not names:
        raise DiscoveryError("no task modules given: pass one or more module names such as myapp.tasks")
    classes = task_classes_in(import_modules(names))
    if not classes:
        raise DiscoveryError(f"no Task subclasses found in {', '.join(names)}")
    return classes


def defined_in(task_class: type[Task], module_name: str) -> bool:
    """Whether ``task_class`` is defined in the module ``module_name`` or one of its submodules."""
    return task_class.__module__ == module_name or task_class.__module__.startswith(f"{module_name}.")


def imported_from_elsewhere(names: Sequence[str], wanted: Collection[type[Task]]) -> list[str]:
    """One line per named module that holds classes of ``wanted`` defined outside it (and its submodules).

    A worker runs every task class it finds in a module, imported ones included; an
    import added for another reason (a type hint, a link) would quietly make it run that
    class too, so the operator is told.
    """
    lines = []
    for name in names:
        module = sys.modules.get(name) or importlib.import_module(name)
        foreign = [cls for cls in task_classes_in([module]) if cls in wanted and not defined_in(cls, module.__name__)]
        if foreign:
            where = ", ".join(f"{cls.__name__} (defined in {cls.__module__})" for cls in foreign)
            lines.append(f"{name} imports task classes defined elsewhere, and this worker runs them too: {where}")
    return lines


def find_class(classes: Sequence[type[Task]], name: str) -> type[Task]:
    """The class called ``name`` (``Email`` or ``myapp.tasks.Email``) among ``classes``."""
    matches = [cls for cls in classes if name in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}")]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(sorted(cls.__name__ for cls in classes)) or "none"
    if not matches:
        raise DiscoveryError(f"unknown task class {name!r}; known classes: {known}")
    qualified = ", ".join(f"{cls.__module__}.{cls.__qualname__}" for cls in matches)
    raise DiscoveryError(f"task class name {name!r} is ambiguous; use one of: {qualified}")


def documents_in(modules: Sequence[ModuleType]) -> list[type[Document]]:
    """Every other Beanie ``Document`` reachable as a module attribute (imported ones too), each once.

    A worker's tasks often write the app's own models: the CLI registers these with its
    task classes, so ``run()`` never meets an uninitialised model. Beanie's own classes are left out.
    """
    found: dict[type[Document], None] = {}
    for module in modules:
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, Document)
                and not issubclass(value, Task)
                and value.__module__.split(".")[0] != "beanie"
            ):
                found.setdefault(value)
    return list(found)


def load_callable(spec: str) -> Callable[..., Any]:
    """``"myapp.worker:setup"`` -> that function; errors say what is wrong with ``spec``."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise DiscoveryError(f"{spec!r} is not module:function (for example myapp.worker:setup)")
    module = import_modules([module_name])[0]
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise DiscoveryError(f"module {module_name!r} has no {attribute!r} (from {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise DiscoveryError(f"{spec!r} is a {type(target).__name__}, not a function")
    return target  # type: ignore[no-any-return]
