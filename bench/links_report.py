"""The dependency fan-out and fan-in section, and ``links-large.md``, the run of its large sizes.

``make bench`` measures a fan-out and a fan-in of 100. ``python -m bench --links-large``
measures 100, 1,000 and 10,000 in a run of its own and writes ``links-large.md`` (with
its own header: date, machine, load, server) and ``links-large.json`` beside
``latest.md``. Section 7 of ``latest.md`` shows the large run's tables under their own
heading: a full run reads them from the JSON, and a ``--links-large`` run rewrites that
section of the ``latest.md`` it finds (the rest of the file is left as it was).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.markdown import load, number, table

if TYPE_CHECKING:
    from bench.run import Results

HEADING = "## 7. Dependency fan-out and fan-in"
LARGE_MD = "links-large.md"
LARGE_JSON = "links-large.json"
LARGE_COMMAND = "python -m bench --links-large"


def seconds_cell(seconds: float | None, count: int) -> str:
    """Seconds in all, and milliseconds per link."""
    if seconds is None:
        return "-"
    total = f"{seconds:.2f}" if seconds < 10 else f"{seconds:.1f}"
    return f"{total} ({seconds / count * 1000:.1f} ms)"


def per_link(value: float) -> str:
    """Commands per link; bulk figures are far below 0.01."""
    return number(value) if value == 0 or value >= 0.01 else f"{value:.3f}"


def commands_cell(by_name: Mapping[str, int] | None) -> str:
    if not by_name:
        return "-"
    names = ", ".join(f"{name} {count}" for name, count in sorted(by_name.items()))
    return f"{sum(by_name.values())} ({names})"


def fan_out_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for row in rows:
        count = row["fan_out"]
        bulk = row.get("fan_out_push_many_commands_per_link")
        lines.append(
            [
                f"{count:,}",
                number(row["fan_out_push_commands_per_link"]),
                seconds_cell(row["fan_out_push_seconds"], count),
                "-" if bulk is None else per_link(bulk),
                seconds_cell(row.get("fan_out_push_many_seconds"), count),
                commands_cell(row.get("fan_out_finish_commands")),
                per_link(row["fan_out_finish_commands_per_link"]),
                seconds_cell(row["fan_out_finish_seconds"], count),
            ]
        )
    header = [
        "dependents",
        "`push()` one by one: commands / dependent",
        "s (ms / dependent)",
        "`push_many`: commands / dependent",
        "s (ms / dependent)",
        "`finish()` of the one task: commands",
        "commands / dependent",
        "s (ms / dependent)",
    ]
    return table(header, lines)


def fan_in_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for row in rows:
        count = row["fan_in"]
        refused = row.get("fan_in_refused")
        if refused:
            lines.append([f"{count:,}", f"**refused at push**: {refused}", "-", "-", "-"])
            continue
        lines.append(
            [
                f"{count:,}",
                f"{row['fan_in_push_commands']} commands in {row['fan_in_push_seconds']:.2f} s",
                number(row["fan_in_finish_commands_per_link"]),
                f"{row['fan_in_finish_seconds_per_link'] * 1000:.1f}",
                f"{row.get('fan_in_finish_seconds', row['fan_in_finish_seconds_per_link'] * count):.1f}",
            ]
        )
    header = ["links", "push of the dependent", "finishes: commands / link", "ms / link", "s (all finishes)"]
    return table(header, lines)


def growth(rows: Sequence[Mapping[str, Any]]) -> str:
    """Milliseconds per link at the smallest and the largest size: linear when they stay alike."""
    if len(rows) < 2:
        return ""
    small, large = rows[0], rows[-1]

    def per(row: Mapping[str, Any], key: str, count_key: str) -> str:
        value = row.get(key)
        return "-" if value is None else f"{value / row[count_key] * 1000:.1f}"

    parts = [
        f"`{label}` {per(small, key, 'fan_out')} → {per(large, key, 'fan_out')}"
        for label, key in (
            ("push()", "fan_out_push_seconds"),
            ("push_many", "fan_out_push_many_seconds"),
            ("finish()", "fan_out_finish_seconds"),
        )
    ]
    text = f"Milliseconds per dependent from {small['fan_out']:,} to {large['fan_out']:,} dependents: " + ", ".join(
        parts
    )
    measured = [row for row in rows if not row.get("fan_in_refused")]
    if len(measured) >= 2:
        first, last = measured[0], measured[-1]
        low, high = (row["fan_in_finish_seconds_per_link"] * 1000 for row in (first, last))
        sizes = f"{first['fan_in']:,} to {last['fan_in']:,} links"
        text += f"; per finished fan-in link from {sizes}: {low:.1f} → {high:.1f}"
    return text + "."


def tables(rows: Sequence[Mapping[str, Any]]) -> str:
    text = "Fan-out:\n\n" + fan_out_table(rows) + "\n\nFan-in:\n\n" + fan_in_table(rows)
    line = growth(rows)
    return text + ("\n\n" + line if line else "")


def intro(limit: Any) -> str:
    return (
        "Fan-out: N dependents of one task, pushed with one `push_many` (then removed), pushed again one `push()` "
        "at a time, then the one task finished: its finisher tells them 500 a page (one `find` of the page, one bulk "
        "write of the tells, one `find` of the counters they leave, one bulk write releasing those ready). Fan-in: "
        "one dependent of N tasks, pushed, then the N finished one by one (claimed beforehand in batches, not "
        f"counted). A dependent may wait for at most {limit:,} tasks, by design: each link's end rewrites the "
        "dependent's own document, which holds every link, so a larger fan-in would cost more than linear time; "
        "it is refused at push with the error shown. `make bench` runs N = 100; "
        f"`{LARGE_COMMAND}` runs 100, 1,000 and 10,000 in a run of its own (`bench/results/{LARGE_MD}`)."
    )


def large_heading(large: Mapping[str, Any]) -> str:
    machine, server = large.get("machine", {}), large.get("server", {})
    return (
        f"### 100, 1,000 and 10,000 links (`{LARGE_COMMAND}`, a separate run: {machine.get('date')}, "
        f"{large.get('seconds', 0):.0f} s, {server.get('label')}, load {load(machine.get('load_start'))} at the "
        f"start; details in `bench/results/{LARGE_MD}`)"
    )


def links_section(rows: Sequence[Mapping[str, Any]], large: Mapping[str, Any] | None = None) -> str:
    """Section 7: this run's ``rows``, then the large run's tables when there is one."""
    if not rows and not large:
        return f"{HEADING}\n\nNot measured in this run."
    limit = (rows or (large or {}).get("links") or [{}])[0].get("max_links_per_task", "?")
    parts = [HEADING, intro(limit)]
    if rows:
        parts.append(tables(rows))
    elif large:
        parts.append(
            "The tables below come from the large run alone (its N = 100 row included): it was run after the rest of "
            "this report; the next `make bench` puts its own N = 100 row above them."
        )
    if large and large.get("links"):
        parts += [large_heading(large), tables(large["links"])]
    return "\n\n".join(parts)


def read_large(out: Path) -> dict[str, Any] | None:
    path = out / LARGE_JSON
    if not path.exists():
        return None
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def large_markdown(results: Results) -> str:
    machine, server = results.machine, results.server
    header = (
        "# Dependency links at 100, 1,000 and 10,000\n\n"
        f"Generated by `{LARGE_COMMAND}`; do not edit by hand. Method and discussion: `docs/performance.md` "
        "(section 7); the other sections are in `bench/results/latest.md`.\n\n"
        f"- run: {machine.get('date')}, {results.seconds:.0f} s\n"
        f"- machine: {machine.get('cpus')} CPUs, {machine.get('platform')}, Python {machine.get('python')}\n"
        f"- server: {server.get('label')}, reports version {server.get('version')}\n"
        f"- load average (1, 5, 15 min) at the start: {load(machine.get('load_start'))}; "
        f"at the end: {load(machine.get('load_end'))}"
    )
    limit = results.links[0].get("max_links_per_task", "?") if results.links else "?"
    parts = [header, intro(limit), tables(results.links) if results.links else "Not measured in this run."]
    if results.errors:
        parts.append("## Errors\n\n" + "\n".join(f"- {name}: {text}" for name, text in results.errors.items()))
    return "\n\n".join(parts) + "\n"


def splice_section(markdown: str, section: str) -> str:
    """``markdown`` with its section 7 replaced by ``section`` (added at the end when it has none)."""
    start = markdown.find(HEADING)
    if start == -1:
        return markdown.rstrip("\n") + "\n\n" + section + "\n"
    end = markdown.find("\n## ", start + len(HEADING))
    tail = markdown[end:] if end != -1 else "\n"
    return markdown[:start] + section + "\n" + tail


def write_large(results: Results, out: Path) -> Path:
    """Write ``links-large.md`` and ``.json``; show the tables in section 7 of the ``latest.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": results.machine,
        "server": results.server,
        "seconds": results.seconds,
        "links": results.links,
    }
    (out / LARGE_JSON).write_text(json.dumps(record, indent=1, default=str) + "\n")
    markdown = out / LARGE_MD
    markdown.write_text(large_markdown(results))
    latest = out / "latest.md"
    if latest.exists() and not results.errors:
        latest.write_text(splice_section(latest.read_text(), links_section([], record)))
    return markdown
