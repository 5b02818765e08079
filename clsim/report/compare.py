"""Side-by-side comparison of finished run folders (``clsim report RUN [RUN ...]``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from clsim.errors import ConfigError
from clsim.metrics import seen_accuracy
from clsim.report import plots
from clsim.report.run_folder import (
    atomic_write_bytes,
    atomic_write_text,
    fmt_percent,
    fmt_seconds,
    md_table,
    read_run,
    section_label,
)

COLUMNS = (
    ("average_accuracy", "avg acc (%)"),
    ("average_incremental_accuracy", "avg inc acc (%)"),
    ("forgetting", "forgetting (%)"),
    ("bwt", "BWT (%)"),
)
GROUP_COLUMNS = (
    ("head_accuracy", "head (%)"),
    ("medium_accuracy", "medium (%)"),
    ("tail_accuracy", "tail (%)"),
)


def compare_runs(run_dirs: list[Path], out_dir: Path) -> str:
    """Compare finished runs; write ``out_dir/comparison.md`` and ``out_dir/comparison.png``.

    Returns the markdown table: one row per run with its strategy, model, average accuracy,
    average incremental accuracy, forgetting, BWT, head/medium/tail (when any run has them) and
    wall time. The figure shows each run's average accuracy over seen experiences after each
    experience. Raises :class:`ConfigError` when a folder is not a finished run.
    """
    if not run_dirs:
        raise ConfigError("", "nothing to compare: give at least one run folder")
    runs = [read_run(d) for d in run_dirs]
    labels = run_labels([r["path"] for r in runs])
    table = comparison_table(runs, labels)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series = {label: seen_accuracy(r["metrics"]["accuracy_matrix"])
              for label, r in zip(labels, runs)}
    atomic_write_bytes(out_dir / "comparison.png", plots.comparison_png(series))
    atomic_write_text(out_dir / "comparison.md", "\n\n".join([
        f"# Comparison of {len(runs)} runs", table,
        "![average accuracy over seen experiences](comparison.png)"]) + "\n")
    return table


def run_labels(paths: list[Path]) -> list[str]:
    """Folder names; where two runs share one, prefixed with parent folders until they differ
    (``a/seed0`` and ``b/seed0``)."""
    parts = [Path(p).resolve().parts for p in paths]
    depth = [1] * len(parts)
    while True:
        labels = ["/".join(pt[-d:]) for pt, d in zip(parts, depth)]
        counts = Counter(labels)
        clashing = [i for i, label in enumerate(labels)
                    if counts[label] > 1 and depth[i] < len(parts[i])]
        if not clashing:  # all distinct, or the very same folder given twice
            return labels
        for i in clashing:
            depth[i] += 1


def comparison_table(runs: list[dict[str, Any]], labels: list[str]) -> str:
    """The markdown table of :func:`compare_runs` for runs loaded by ``read_run``."""
    columns = list(COLUMNS)
    # Head/medium/tail only mean something on long-tailed runs: show them if any run has them.
    if any(r["metrics"].get(key) is not None for r in runs for key, _ in GROUP_COLUMNS):
        columns += GROUP_COLUMNS
    header = ["run", "strategy", "model", *(title for _, title in columns), "wall time (s)"]
    rows = [[label, section_label(r["config"].get("strategy")),
             section_label(r["config"].get("model")),
             *(fmt_percent(r["metrics"].get(key)) for key, _ in columns),
             fmt_seconds(r["metrics"].get("wall_time_s"))]
            for label, r in zip(labels, runs)]
    return md_table(header, rows)
