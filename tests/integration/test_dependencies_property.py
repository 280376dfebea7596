"""Property: over random DAGs with random outcomes and interleavings, every task ends as the rules predict.

Each example pushes up to 30 tasks in topological order, interleaved at random with
pops that finish or fail the claimed task, so dependencies end before, during and after
their dependents are pushed. The final states must match a pure-Python model of the
rules, no task may stay blocked, and no task may be claimed before its links are met.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from beanie import Link, init_beanie
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from beanie_tasks import DependencyType, OnFailure, State, Task, depends_on
from beanie_tasks.driver import close_client
from tests.conftest import Backend


class Node(Task):
    label: int
    succeed: bool = True
    direct: Link[Node] | None = depends_on(DependencyType.DIRECT, default=None)
    all_of: list[Link[Node]] = depends_on(DependencyType.ALL_OF, default_factory=list)
    any_of: list[Link[Node]] = depends_on(DependencyType.ANY_OF, default_factory=list)
    tolerant: list[Link[Node]] = depends_on(DependencyType.ALL_OF, on_failure=OnFailure.RUN, default_factory=list)


FIELDS = ("direct", "all_of", "any_of", "tolerant")


@dataclass
class Spec:
    succeed: bool
    links: dict[str, list[int]] = field(default_factory=dict)


@st.composite
def dags(draw: st.DrawFn) -> tuple[list[Spec], list[bool]]:
    size = draw(st.integers(min_value=2, max_value=30))
    specs = []
    for index in range(size):
        spec = Spec(succeed=draw(st.sampled_from([True, True, True, False])))
        if index:
            earlier = st.integers(min_value=0, max_value=index - 1)
            if draw(st.booleans()):
                spec.links["direct"] = [draw(earlier)]
            for name in ("all_of", "any_of", "tolerant"):
                spec.links[name] = sorted(set(draw(st.lists(earlier, max_size=3))))
        specs.append(spec)
    # True: push the next task; False: pop one ready task and complete it.
    steps = draw(st.lists(st.booleans(), min_size=size, max_size=3 * size))
    return specs, steps


def expected_states(specs: list[Spec]) -> list[State]:
    """The rules, applied in topological order."""
    final: list[State] = []
    for spec in specs:
        fatal = False
        for name, deps in spec.links.items():
            ends = [final[d] for d in deps]
            if not ends or name == "tolerant":
                continue
            if name == "any_of":
                fatal = fatal or State.FINISHED not in ends
            else:
                fatal = fatal or any(s is not State.FINISHED for s in ends)
        final.append(State.FAILED if fatal else (State.FINISHED if spec.succeed else State.FAILED))
    return final


async def assert_met(task: Node, ended: dict[int, State]) -> None:
    """At claim time, each link field of ``task`` must already be met.

    ``ended`` holds the outcomes this test applied; a link missing there may have been
    failed by propagation, which is final, so reading it after the claim is sound.
    """
    for name in FIELDS:
        value = getattr(task, name)
        links = [] if value is None else (value if isinstance(value, list) else [value])
        if not links:
            continue
        states = []
        for link in links:
            label = link_labels[link.ref.id]
            if label in ended:
                states.append(ended[label])
            else:
                stored = await Node.get(link.ref.id)
                assert stored is not None
                states.append(stored.state if stored.state is State.FAILED else None)
        labels = [link_labels[link.ref.id] for link in links]
        if name == "any_of":
            assert State.FINISHED in states, f"{task.label} claimed before any of {labels} finished"
        elif name == "tolerant":
            assert None not in states, f"{task.label} claimed before all of {labels} ended: {states}"
        else:
            assert all(s is State.FINISHED for s in states), f"{task.label} claimed before {labels} finished: {states}"


link_labels: dict[Any, int] = {}


async def scenario(backend: Backend, specs: list[Spec], steps: list[bool]) -> None:
    client = backend.client()
    name = f"bt_prop_{uuid.uuid4().hex[:10]}"
    try:
        await init_beanie(database=client[name], document_models=[Node])
        pushed: list[Node] = []
        ended: dict[int, State] = {}
        link_labels.clear()

        async def push_next() -> None:
            index = len(pushed)
            spec = specs[index]
            values: dict[str, Any] = {n: [pushed[d] for d in deps] for n, deps in spec.links.items()}
            if "direct" in values:
                values["direct"] = values["direct"][0]
            node = await Node(label=index, succeed=spec.succeed, **values).push()
            link_labels[node.id] = index
            pushed.append(node)

        async def complete_one() -> bool:
            task = await Node.pop()
            if task is None:
                return False
            await assert_met(task, ended)
            if task.succeed:
                await task.finish()
                ended[task.label] = State.FINISHED
            else:
                await task.fail("planned failure", retry=False)
                ended[task.label] = State.FAILED
            return True

        for push in steps:
            if push and len(pushed) < len(specs):
                await push_next()
            else:
                await complete_one()
        while len(pushed) < len(specs):
            await push_next()
        while await complete_one():
            pass
        expected = expected_states(specs)
        stored = {n.label: n async for n in Node.find_all()}
        actual = [stored[i].state for i in range(len(specs))]
        assert actual == expected, f"\nexpected {expected}\nactual   {actual}"
        for index, state in enumerate(expected):
            if state is State.FAILED and index not in ended:
                error = stored[index].error
                assert error is not None and "dependen" in error, error
    finally:
        await client.drop_database(name)
        await close_client(client)


# No shrinking: on a failure the first example is printed at once instead of minutes later.
@pytest.mark.slow
@settings(
    max_examples=12,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=dags())
def test_random_dags_end_as_the_rules_predict(backend: Backend, case: tuple[list[Spec], list[bool]]) -> None:
    specs, steps = case
    asyncio.run(scenario(backend, specs, steps))


def test_the_model_itself() -> None:
    specs = [
        Spec(True),
        Spec(False),
        Spec(True, {"all_of": [0, 1]}),
        Spec(True, {"any_of": [0, 1]}),
        Spec(True, {"tolerant": [1, 2]}),
        Spec(True, {"direct": [2]}),
    ]
    assert expected_states(specs) == [
        State.FINISHED,
        State.FAILED,
        State.FAILED,
        State.FINISHED,
        State.FINISHED,
        State.FAILED,
    ]


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
