"""Markdown tables for the reports (a leaf: run_folder, federation and compare use it)."""

from __future__ import annotations

from typing import Any


def md_cell(text: Any) -> str:
    """Make ``text`` safe inside a markdown table cell (a '|' would split the cell)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
