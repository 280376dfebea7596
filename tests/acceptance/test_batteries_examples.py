"""The beanie-batteries-queue README examples, with only the import changed.

Class bodies and the statements that use them are copied from that README; where
the README only declares a class (the multiple-link examples), the code that pushes
and pops is ours. No ``from __future__ import annotations`` here: the README does
not use it, and classes declared inside a test resolve their links at once.
"""

from typing import Any, Optional

import pytest
from pydantic import Field

from beanie_tasks import DependencyType, Link, Priority, State, Task

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class SimpleTask(Task):
    s: str


@pytest.fixture
async def init(init_tasks: Any) -> Any:
    async def _init(*models: type) -> None:
        await init_tasks(SimpleTask, *models)

    return _init


async def test_process_a_task_with_queue(init: Any) -> None:
    await init()
    # Producer
    task = SimpleTask(s="test")
    await task.push()

    # Consumer
    async for task in SimpleTask.queue():
        assert task.s == "test"
        # Do some work
        await task.finish()
        break

    # Check that the task is finished
    task = await SimpleTask.find_one({"s": "test"})
    assert task.state == State.FINISHED


async def test_process_a_task_with_pop(init: Any) -> None:
    await init()
    # Producer
    task = SimpleTask(s="test")
    await task.push()

    # Consumer
    task = await SimpleTask.pop()
    assert task.s == "test"
    # Do some work
    await task.finish()


async def test_priority(init: Any) -> None:
    await init()
    task1 = SimpleTask(s="test1", priority=Priority.LOW)
    await task1.push()
    task2 = SimpleTask(s="test2", priority=Priority.HIGH)
    await task2.push()

    async for task in SimpleTask.queue():
        assert task.s == "test2"
        await task.finish()
        break


async def test_failed_state(init: Any) -> None:
    await init()
    task = SimpleTask(s="test")
    await task.push()

    async for task in SimpleTask.queue():
        assert task.state == State.RUNNING
        await task.fail()
        break

    task = await SimpleTask.find_one({"s": "test"})
    assert task.state == State.FAILED


async def test_direct_dependency_pop_returns_none_until_it_finishes(init: Any) -> None:
    class TaskWithDirectDependency(Task):
        s: str
        direct_dependency: Link[SimpleTask] = Field(dependency_type=DependencyType.DIRECT)

    await init(TaskWithDirectDependency)

    task1 = SimpleTask(s="test1")
    await task1.push()

    task2 = TaskWithDirectDependency(s="test2", direct_dependency=task1)
    await task2.push()

    task_from_queue = await TaskWithDirectDependency.pop()
    assert task_from_queue is None
    # task2 is not popped from the queue because task1 is not finished yet

    await task1.finish()

    task_from_queue = await TaskWithDirectDependency.pop()
    assert task_from_queue is not None
    # task2 is popped from the queue because task1 is finished


async def test_all_of_dependency(init: Any) -> None:
    class TaskWithMultipleDependencies(Task):
        s: str
        list_of_dependencies: Link[SimpleTask] = Field(dependency_type=DependencyType.ALL_OF)

    class TaskWithListOfDependencies(Task):
        s: str
        list_of_dependencies: list[Link[SimpleTask]] = Field(dependency_type=DependencyType.ALL_OF)

    await init(TaskWithMultipleDependencies, TaskWithListOfDependencies)
    first, second = SimpleTask(s="a"), SimpleTask(s="b")
    await first.push()
    await second.push()
    await TaskWithMultipleDependencies(s="one", list_of_dependencies=first).push()
    await TaskWithListOfDependencies(s="all", list_of_dependencies=[first, second]).push()
    assert await TaskWithMultipleDependencies.pop() is None
    await first.finish()
    assert await TaskWithMultipleDependencies.pop() is not None
    assert await TaskWithListOfDependencies.pop() is None
    await second.finish()
    assert await TaskWithListOfDependencies.pop() is not None


async def test_any_of_dependency(init: Any) -> None:
    class TaskWithMultipleDependencies(Task):
        s: str
        list_of_dependencies: list[Link[SimpleTask]] = Field(dependency_type=DependencyType.ANY_OF)

    await init(TaskWithMultipleDependencies)
    first, second = SimpleTask(s="a"), SimpleTask(s="b")
    await first.push()
    await second.push()
    await TaskWithMultipleDependencies(s="any", list_of_dependencies=[first, second]).push()
    assert await TaskWithMultipleDependencies.pop() is None
    await second.finish()
    assert await TaskWithMultipleDependencies.pop() is not None


async def test_multiple_links_with_different_types(init: Any) -> None:
    class TaskWithMultipleDependencies(Task):
        s: str
        list_of_dependencies_all: Link[SimpleTask] = Field(dependency_type=DependencyType.ALL_OF)
        list_of_dependencies_any: Link[SimpleTask] = Field(dependency_type=DependencyType.ANY_OF)
        direct_dependency: Link[SimpleTask] = Field(dependency_type=DependencyType.DIRECT)

    await init(TaskWithMultipleDependencies)
    deps = [SimpleTask(s=name) for name in ("all", "any", "direct")]
    for dep in deps:
        await dep.push()
    await TaskWithMultipleDependencies(
        s="mixed", list_of_dependencies_all=deps[0], list_of_dependencies_any=deps[1], direct_dependency=deps[2]
    ).push()
    for dep in deps:
        assert await TaskWithMultipleDependencies.pop() is None
        await dep.finish()
    assert await TaskWithMultipleDependencies.pop() is not None


async def test_optional_dependency(init: Any) -> None:
    class TaskWithOptionalDependency(Task):
        s: str
        direct_dependency: Optional[Link[SimpleTask]] = Field(None, dependency_type=DependencyType.DIRECT)  # noqa: UP045
        list_of_dependencies: list[Link[SimpleTask]] = Field([], dependency_type=DependencyType.ALL_OF)

    await init(TaskWithOptionalDependency)
    await TaskWithOptionalDependency(s="alone").push()
    task = await TaskWithOptionalDependency.pop()
    assert task is not None and task.s == "alone"

    dependency = SimpleTask(s="dep")
    await dependency.push()
    await TaskWithOptionalDependency(s="linked", direct_dependency=dependency).push()
    assert await TaskWithOptionalDependency.pop() is None
    await dependency.finish()
    task = await TaskWithOptionalDependency.pop()
    assert task is not None and task.s == "linked"
