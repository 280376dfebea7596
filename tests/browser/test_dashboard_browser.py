"""The dashboard in headless Chromium: every page loads without a JS error, and a click cancels a running task.

Needs Debian's ``chromium`` and ``chromium-driver`` packages (``.ci/run`` installs them) and
selenium; without them the test skips and says so. Screenshots go to the test's temporary
folder; ``BEANIE_TASKS_SCREENSHOTS=docs/images`` writes them where the docs show them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from beanie import Link

from beanie_tasks import DependencyType, State, Task, depends_on
from beanie_tasks.store import record_worker
from tests.conftest import stop_subprocess

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "headless Chromium is not installed: apt-get install chromium chromium-driver to run the browser test",
        allow_module_level=True,
    )
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


class Thumbnail(Task):
    image: str = ""

    async def run(self) -> None:
        pass


class Album(Task):
    cover: Link[Thumbnail] = depends_on(DependencyType.DIRECT)


class Nightly(Task):
    class TaskSettings:
        cron = "0 3 * * *"


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(Thumbnail, Album, Nightly)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def seed(db: Any) -> tuple[Thumbnail, Thumbnail]:
    for n in range(6):
        await Thumbnail(image=f"photo-{n}.jpg", priority=1 + n % 3).push()
    for _ in range(3):
        done = await Thumbnail.pop()
        assert done is not None
        await done.finish({"width": 320})
    broken = await Thumbnail.pop()
    assert broken is not None
    await broken.fail("PIL.UnidentifiedImageError: cannot identify image file <photo.jpg>")
    running = await Thumbnail.pop()
    assert running is not None
    await running.set_progress(0.4, "resizing")
    waiting = await Thumbnail(image="cover.jpg", priority=3).push()
    await Album(cover=waiting).push()
    await record_worker(
        db, "web-1:4242", {"host": "web-1", "pid": 4242, "concurrency": 8, "classes": ["Thumbnail"]}, keep_for=600
    )
    return running, waiting


@pytest.mark.wire
async def test_pages_load_and_cancel_by_click(backend: Any, db: Any, tmp_path: Path) -> None:
    running, waiting = await seed(db)
    port = free_port()
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])}
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "beanie_tasks.cli", "dashboard", __name__, "--port", str(port),
        "--uri", backend.uri, "--database", db.name,
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert server.stderr is not None
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = None
    try:
        await asyncio.wait_for(server.stderr.readline(), timeout=60)
        browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
        base = f"http://127.0.0.1:{port}"
        images = Path(os.environ.get("BEANIE_TASKS_SCREENSHOTS") or tmp_path)
        images.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a local folder, once
        pages = {
            "overview": "/",
            "tasks": "/tasks/Thumbnail",
            "task": f"/tasks/Album/{(await Album.find_one()).id}",  # type: ignore[union-attr]
            "schedules": "/schedules",
        }
        for name, path in pages.items():
            browser.get(base + path)
            WebDriverWait(browser, 20).until(lambda b: b.execute_script("return document.readyState") == "complete")
            await asyncio.sleep(0.5)  # let htmx and the event stream start
            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, (name, errors)
            assert browser.find_element(By.TAG_NAME, "header")
            assert browser.save_screenshot(str(images / f"dashboard-{name}.png"))
        browser.get(f"{base}/tasks/Thumbnail")
        WebDriverWait(browser, 20).until(
            lambda b: "live " in (b.find_element(By.ID, "live").get_attribute("class") or "x")
        )
        fresh = await Thumbnail(image="pushed-while-watching.jpg").push()
        WebDriverWait(browser, 30).until(lambda b: str(fresh.id) in b.page_source)  # no reload: the list refreshed
        browser.get(f"{base}/tasks/Thumbnail/{running.id}")
        browser.find_element(By.ID, "action-cancel").click()
        WebDriverWait(browser, 20).until(expected_conditions.alert_is_present())
        browser.switch_to.alert.accept()
        WebDriverWait(browser, 20).until(lambda b: "cancel: done" in b.find_element(By.ID, "flash").text)
        stored = await Thumbnail.get(running.id)
        assert stored is not None and stored.state == State.CANCELLED
        assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert (await Thumbnail.get(waiting.id)).state == State.CREATED  # type: ignore[union-attr]
    finally:
        if browser is not None:
            browser.quit()
        await stop_subprocess(server)
