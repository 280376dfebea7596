"""Markdown helpers shared by the reports: tables, numbers, load averages."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def number(value: float) -> str:
    return f"{value:g}" if value == int(value) else f"{value:.2f}"


def load(averages: Any) -> str:
    return " / ".join(f"{value:.1f}" for value in averages) if averages else "not available"
