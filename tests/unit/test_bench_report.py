"""The benchmark report renders the CPU, idle, waiters and links sections from a results dict, with no server."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from bench.links_report import LARGE_JSON, LARGE_MD, write_large
from bench.report import write_markdown, write_report
from bench.run import Results, Sizes


def drain(cpu_us: list[float], **commands: float) -> dict[str, object]:
    return {"cpu_us": cpu_us, "commands_per_task": commands}


def fake_results() -> Results:
    results = Results(mode="quick", sizes=Sizes.quick())
    results.server = {"label": "fake", "version": "0"}
    results.cpu = {
        "rounds": 2,
        "tasks": 40,
        "worker_tasks": 40,
        "mirror_differences": [],
        "push": {"ours": [1200.0, 1300.0], "raw": [1000.0, 1000.0], "built": [1100.0, 1200.0]},
        "pop_finish": {"ours": [2100.0, 2300.0], "raw": [2000.0, 2000.0]},
        "worker": {
            1: {"ours": drain([4000.0, 4200.0], findAndModify=2.0, getMore=1.5), "raw": drain([2800.0, 2800.0])},
            16: {
                "ours": drain([3000.0, 3100.0], find=0.1, update=0.2, getMore=0.1),
                "raw": drain([3000.0, 3000.0], findAndModify=2.3),
            },
        },
        "peers": {"mongo-taskqueue": {"push": [700.0, 650.0], "claim_finish": [2000.0, 2400.0]}},
    }
    results.idle = [
        {
            "layout": "1 class",
            "classes": 1,
            "collections": 1,
            "seconds": 3.0,
            "per_second": {"getMore": 1.0, "findAndModify": 1.0},
            "total_per_second": 2.0,
        },
        {
            "layout": "4 classes, 4 collections",
            "classes": 4,
            "collections": 4,
            "seconds": 3.0,
            "per_second": {"getMore": 0.5},
            "total_per_second": 0.5,
        },
    ]
    results.waiters = {
        "waiters": 1000,
        "pool": 100,
        "push_baseline": [0.004, 0.005],
        "push_while_starting": [0.05, 0.3],
        "push_while_waiting": [0.004],
        "push_while_waking": [0.006, 0.08],
        "start_commands": {"find": 1000, "aggregate": 1},
        "start_seconds": 1.5,
        "end_commands": {"find": 1000, "update": 1},
        "first_return_seconds": 1.6,
        "all_returned_seconds": 2.2,
        "median_return_seconds": 1.9,
        "end_update_seconds": 0.4,
    }
    results.links = [
        {
            "fan_out": 100,
            "fan_in": 100,
            "max_links_per_task": 1000,
            "fan_out_push_commands_per_link": 3.0,
            "fan_out_push_seconds": 1.0,
            "fan_out_finish_commands_per_link": 0.06,
            "fan_out_finish_commands": {"findAndModify": 1, "find": 2, "update": 3},
            "fan_out_finish_seconds": 0.5,
            "fan_out_push_many_commands_per_link": 0.03,
            "fan_out_push_many_seconds": 0.1,
            "fan_in_push_seconds": 0.4,
            "fan_in_push_commands": 102,
            "fan_in_finish_commands_per_link": 3.0,
            "fan_in_finish_seconds_per_link": 0.02,
        }
    ]
    return results


def section(markdown: str, heading: str) -> str:
    start = markdown.index(heading)
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end != -1 else None]


def test_cpu_section_gives_ratios_against_the_raw_loop_and_verdicts_on_the_targets() -> None:
    cpu = section(write_markdown(fake_results()), "## 8. Client CPU per task")
    push = next(line for line in cpu.splitlines() if line.startswith("| `push()`"))
    # Per-round ratios 1.2 and 1.3: median 1.25 against the 1.15 target.
    assert "1.25x (1.20-1.30)" in push and "1.15x" in push and "MISSED" in push
    hot = next(line for line in cpu.splitlines() if line.startswith("| `pop()` + `finish()`"))
    assert "1.10x (1.05-1.15)" in hot and "| met |" in hot
    at16 = next(line for line in cpu.splitlines() if "concurrency 16, draining" in line)
    assert "1.02x" in at16 and "1.25x" in at16 and "| met |" in at16
    at1 = next(line for line in cpu.splitlines() if "concurrency 1, draining" in line)
    assert at1.rstrip().endswith("| - | - |")  # no target at concurrency 1
    assert "mongo-taskqueue: push (Motor)" in cpu and "0.68x of our raw loop" in cpu
    assert "exactly the shape beanie-tasks sends" in cpu


def test_cpu_section_splits_the_push_gap_into_building_the_model_and_push_itself() -> None:
    cpu = section(write_markdown(fake_results()), "## 8. Client CPU per task")
    built = next(line for line in cpu.splitlines() if line.startswith("| raw `insert_one` after building the model"))
    assert "1150" in built and "1.15x (1.10-1.20)" in built
    # Medians: push 1250, raw 1000, built 1150: of the 250 µs gap, 150 (60%) is the model.
    assert "Of `push()`'s 250 µs over the raw insert" in cpu and "accounts for 150 µs (60%)" in cpu
    assert "the rest, 100 µs, is `push()`'s own work" in cpu


def test_a_command_target_missed_only_by_the_streams_getmores_says_so() -> None:
    results = fake_results()
    results.cpu["worker"][16]["ours"] = drain([3000.0, 3100.0], find=0.2, update=0.15, findAndModify=0.1, getMore=1.0)
    cpu = section(write_markdown(results), "## 8. Client CPU per task")
    assert "(1.45: MISSED)" in cpu
    assert "The claims and finishes alone are 0.45 per task (met)" in cpu
    # Met outright: no explanation.
    assert "claims and finishes alone" not in section(write_markdown(fake_results()), "## 8. Client CPU per task")


def test_cpu_section_counts_worker_commands_by_name_against_both_command_targets() -> None:
    cpu = section(write_markdown(fake_results()), "## 8. Client CPU per task")
    row16 = next(line for line in cpu.splitlines() if line.startswith("| 16 |"))
    assert "find 0.10, getMore 0.10, update 0.20" in row16 and "findAndModify 2.30" in row16
    assert "at most 0.5 commands per task with batched claims (0.40: met)" in cpu
    assert "at most 2.1 with lean change streams (met)" in cpu


def test_cpu_section_names_a_raw_loop_that_no_longer_mirrors_the_library() -> None:
    results = fake_results()
    results.cpu["mirror_differences"] = ["findAndModify#1.hint: only beanie-tasks sends it"]
    cpu = section(write_markdown(results), "## 8. Client CPU per task")
    assert "differ from the library's" in cpu and "hint: only beanie-tasks sends it" in cpu


def test_idle_and_waiters_and_links_sections_render_with_their_targets() -> None:
    markdown = write_markdown(fake_results())
    idle = section(markdown, "## 9. Idle commands per second")
    assert "| 1 class | 1 | 1 | 3 | 2 | findAndModify 1, getMore 1 | MISSED |" in idle
    assert "| 4 classes, 4 collections | 4 | 4 | 3 | 0.50 | getMore 0.50 | met |" in idle
    waiting = section(markdown, "## 10. A thousand concurrent `wait()` calls")
    assert "1,000 tasks" in waiting and "**2.20 s**" in waiting and "(100 connections)" in waiting
    assert "the update itself took 0.40 s" in waiting
    assert "| while the waiters start (each reads its task) | 50.0 | 300.0 | 300.0 | 2 |" in waiting
    assert "## 7. Dependency fan-out and fan-in" in markdown and "| 100 | 3 |" in markdown
    assert markdown.index("## 6. Memory") < markdown.index("## 7. Dependency") < markdown.index("## 8. Client")


def test_sections_left_out_of_a_run_say_so() -> None:
    results = Results(mode="quick", sizes=Sizes.quick())
    markdown = write_markdown(results)
    for heading in ("## 7. Dependency", "## 8. Client CPU per task", "## 9. Idle", "## 10. A thousand"):
        assert "Not measured in this run." in section(markdown, heading)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="the plot needs the bench extra")
def test_the_report_still_writes_its_plot(tmp_path: Path) -> None:
    markdown, plot = write_report(fake_results(), tmp_path)
    assert "## 8. Client CPU per task" in markdown.read_text()
    assert plot.stat().st_size > 0


def large_run() -> Results:
    """A ``--links-large`` run: 100 and 10,000 measured, a fan-in of 10,000 refused."""
    results = Results(mode="links-large", sizes=Sizes())
    results.server = {"label": "fake large", "version": "0"}
    results.machine = {"date": "2026-12-02 14:00 UTC", "cpus": 2, "load_start": (1.0, 1.0, 1.0)}
    results.seconds = 480.0
    small = fake_results().links[0]
    results.links = [
        small,
        small
        | {"fan_out": 10_000, "fan_out_push_seconds": 150.0, "fan_out_finish_seconds": 85.0, "fan_in": 10_000}
        | {"fan_out_push_many_seconds": 10.0}
        | {"fan_in_refused": "FanJoin links 10,000 tasks; a task may depend on at most 1,000"},
    ]
    return results


def test_a_fan_in_over_the_limit_is_reported_refused_with_its_error_and_why() -> None:
    links = section(write_markdown(large_run()), "## 7. Dependency fan-out and fan-in")
    refused = next(line for line in links.splitlines() if line.startswith("| 10,000 | **refused at push**"))
    assert "a task may depend on at most 1,000" in refused
    assert "at most 1,000 tasks, by design" in links and "more than linear time" in links
    assert "from 100 to 10,000 dependents: `push()` 10.0 → 15.0, `push_many` 1.0 → 1.0, `finish()` 5.0 → 8.5" in links


def test_the_large_run_writes_its_own_file_and_replaces_section_7_of_latest(tmp_path: Path) -> None:
    latest = tmp_path / "latest.md"
    latest.write_text(write_markdown(fake_results()))
    before = latest.read_text()
    write_large(large_run(), tmp_path)
    assert (tmp_path / LARGE_JSON).exists()
    own = (tmp_path / LARGE_MD).read_text()
    assert own.startswith("# Dependency links at 100, 1,000 and 10,000") and "480 s" in own
    assert "| 10,000 | **refused at push**" in own
    after = latest.read_text()
    assert section(after, "## 8. Client CPU per task") == section(before, "## 8. Client CPU per task")
    spliced = section(after, "## 7. Dependency fan-out and fan-in")
    assert "a separate run: 2026-12-02 14:00 UTC, 480 s, fake large" in spliced
    assert "| 10,000 | 3 | 150.0 (15.0 ms) |" in spliced and "| 100 | 3 | 1.00 (10.0 ms) |" in spliced
    assert "from the large run alone" in spliced
    # A later full run keeps its own row and shows the large run's tables after it.
    full = section(write_markdown(fake_results(), json.loads((tmp_path / LARGE_JSON).read_text())), "## 7.")
    assert full.index("| 100 | 3 |") < full.index("a separate run") < full.index("| 10,000 | 3 |")
