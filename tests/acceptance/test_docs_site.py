"""The documentation site: it builds strictly, its index and nav reach every page, and the API
reference covers every public name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

import beanie_tasks

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
REFERENCE = (DOCS / "reference.md").read_text()
# Re-exported from Beanie, whose own docs describe it: the reference explains and links it.
FOREIGN = {"Link"}


def pages() -> list[str]:
    return sorted(page.name for page in DOCS.glob("*.md") if page.name != "index.md")


def nav_pages(entries: object) -> set[str]:
    if isinstance(entries, str):
        return {entries}
    if isinstance(entries, list):
        return set().union(*(nav_pages(entry) for entry in entries))
    if isinstance(entries, dict):
        return set().union(*(nav_pages(value) for value in entries.values()))
    return set()


def mkdocs_config() -> dict[str, object]:
    class Loader(yaml.SafeLoader):
        """mkdocs.yml names Python objects (!!python/name:...); only its structure is read here."""

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    loaded: dict[str, object] = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)
    return loaded


def test_every_public_name_is_in_the_reference() -> None:
    documented = set(re.findall(r"^::: beanie_tasks\.(\w+)$", REFERENCE, flags=re.MULTILINE))
    missing = sorted(set(beanie_tasks.__all__) - FOREIGN - documented)
    assert not missing, f"add `::: beanie_tasks.NAME` to docs/reference.md for {missing}"
    for name in FOREIGN:
        assert f"`beanie_tasks.{name}`" in REFERENCE


def test_the_batch_api_and_the_testing_helpers_are_in_the_reference() -> None:
    for name in ("claim_batch", "finish_batch", "Acknowledgement", "Worker", "testing.run_now"):
        assert f"::: beanie_tasks.{name}\n" in REFERENCE, name


def test_the_index_links_every_page_and_the_nav_lists_it() -> None:
    index = (DOCS / "index.md").read_text()
    unlinked = [page for page in pages() if f"]({page}" not in index]
    assert not unlinked, f"docs/index.md does not link {unlinked}"
    listed = nav_pages(mkdocs_config()["nav"])
    assert not [page for page in pages() if page not in listed], "mkdocs.yml nav misses a page"


def test_the_package_declares_its_types() -> None:
    assert (ROOT / "beanie_tasks" / "py.typed").is_file()


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "index.html").read_text().count('id="beanie_tasks.') > 40


def test_the_tasks_page_names_where_the_resolved_heartbeat_interval_is() -> None:
    page = (DOCS / "tasks.md").read_text()
    assert "`task_options.heartbeat_every`" in page and "`task_options.lease`" in page
    options = beanie_tasks.TaskOptions()
    assert options.heartbeat_interval is None
    assert options.heartbeat_every == options.visibility_timeout / 3
