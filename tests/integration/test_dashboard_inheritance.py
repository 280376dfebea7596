"""The dashboard on classes that share one collection (Beanie inheritance): each page and action sees its own class."""

from __future__ import annotations

import re
from typing import Any

import pytest

from beanie_tasks import State, Task

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from beanie_tasks.web import dashboard  # noqa: E402


class Chore(Task):
    class Settings:
        is_root = True
        name = "bt_dashboard_shared"


class Sweep(Chore):
    room: str = ""


class Mop(Chore):
    floor: str = ""


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Chore, Sweep, Mop)


async def test_each_class_sees_only_its_own_tasks() -> None:
    sweep = await Sweep(room="hall").push()
    mop = await Mop(floor="kitchen").push()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=dashboard([Sweep, Mop])), base_url="http://d"
    ) as http:
        listed = await http.get("/tasks/Sweep")
        assert str(sweep.id) in listed.text and str(mop.id) not in listed.text
        assert (await http.get(f"/tasks/Sweep/{mop.id}")).status_code == 404
        page = await http.get(f"/tasks/Mop/{mop.id}")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        hx = {"HX-Request": "true"}
        for action in ("cancel", "run-now", "priority"):
            answer = await http.post(
                f"/tasks/Sweep/{mop.id}/{action}", data={"csrf": token.group(1), "priority": "9"}, headers=hx
            )
            assert answer.status_code == 409, action
        overview = await http.get("/")
        assert re.search(r'data-class="Sweep".*?class="backlog">1<', overview.text, re.S)
    stored = await Mop.get(mop.id)
    assert stored is not None and stored.state == State.CREATED and stored.priority != 9
