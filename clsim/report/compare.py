"""Side-by-side comparison of finished runs (``clsim report RUN_OR_SWEEP_DIR [...]``).

Runs whose configs differ only in ``seed`` form a group; a group's row gives each metric's mean
± sample standard deviation (n - 1 in the denominator) over its seeds. Groups are shown per
experiment (the config's ``name``, e.g. one per base file of a sweep), and labelled by the
config values that tell them apart (``ewc (lambda=1000.0)``, ``train.lr=0.01``).

Written to ``out_dir``: ``comparison.md`` (tables and figures), ``comparison.png`` (average
accuracy over seen experiences, mean with a shaded ± std band, one panel per experiment),
``forgetting.png`` (forgetting per group with ± std error bars) and ``index.html`` (all of it in
one static page, figures embedded).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clsim.errors import ConfigError
from clsim.metrics import seen_accuracy
import clsim.report.plots as plots
from clsim.report.run_folder import (
    CONFIG,
    METRICS,
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
# Federated runs (clsim.federated) add their cost and the clients' view, formatted their own way.
FEDERATED_COLUMNS = (
    ("final_client_accuracy", "mean client acc (%)", fmt_percent),
    ("communication_mb", "MB sent", lambda v: "-" if v is None else f"{v:.2f}"),
    ("simulated_time_s", "simulated time (s)", fmt_seconds),
)
FIGURES = (("comparison.png", "average accuracy over seen experiences (mean ± std over seeds)"),
           ("forgetting.png", "forgetting (mean ± std over seeds)"))


@dataclass
class Group:
    """Runs whose configs are equal apart from the seed."""

    label: str
    config: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [r["metrics"][key] for r in self.runs if _number(r["metrics"].get(key))]

    def seeds(self) -> list[Any]:
        return [r["config"].get("seed", "?") for r in self.runs]


@dataclass
class Experiment:
    """The groups of one experiment (runs sharing the config's ``name``)."""

    name: str
    groups: list[Group]


# ---------------------------------------------------------------- finding and grouping runs

def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders named by ``paths``: each is a run folder or a folder holding them (a sweep's
    finished points, in its ``sweep.json`` order, when it has one; else searched recursively,
    where a run's own subfolders, such as a trained teacher, are not separate runs, even while
    the run is unfinished). A run named twice is listed once."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / METRICS).is_file():
            found.append(path)
            continue
        if path.exists() and not path.is_dir():
            raise ConfigError(str(path), "not a folder: give a run folder or a folder holding them")
        if not path.is_dir():
            raise ConfigError(str(path), "no such run folder")
        inside = _runs_under(path)
        if not inside:
            raise ConfigError(str(path), "not a finished clsim run folder (no metrics.json), "
                                         "and no finished run folders under it")
        found += inside
    seen: set[Path] = set()
    unique = []
    for run in found:  # a run named twice is still one seed of its group
        if run.resolve() not in seen:
            seen.add(run.resolve())
            unique.append(run)
    return unique


def _runs_under(root: Path) -> list[Path]:
    order = _sweep_order(root)
    if order:  # a sweep: its points, nothing else that lies in its folder
        points = sorted(order, key=order.__getitem__)
        return [p for p in points if (p / METRICS).is_file()]
    runs = []
    for folder, subdirs, files in os.walk(root):
        subdirs.sort()
        if str(CONFIG) in files or str(METRICS) in files:
            # A run folder, finished or not: what lies inside (a teacher run) belongs to it.
            subdirs.clear()
            if str(METRICS) in files:
                runs.append(Path(folder))
    return runs


def _sweep_order(root: Path) -> dict[Path, int]:
    """Point folder -> index in the sweep's ``sweep.json`` (empty when there is none); a point's
    id is its folder under the sweep folder (:mod:`clsim.sweep`)."""
    try:
        points = json.loads((root / "sweep.json").read_text())["points"]
        return {root / p["id"]: i for i, p in enumerate(points)}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def group_runs(runs: list[dict[str, Any]]) -> list[Experiment]:
    """Runs (``read_run`` dicts) grouped by config minus seed, per experiment name, in the
    order they were given."""
    groups: dict[str, Group] = {}
    for run in runs:
        config = {k: v for k, v in run["config"].items() if k != "seed"}
        key = json.dumps(config, sort_keys=True, default=str) if config else f"run:{run['path']}"
        groups.setdefault(key, Group(label="", config=config)).runs.append(run)
    by_name: dict[str, list[Group]] = {}
    for group in groups.values():
        by_name.setdefault(str(group.config.get("name", "runs")), []).append(group)
    experiments = [Experiment(name, members) for name, members in by_name.items()]
    for exp in experiments:
        for group, label in zip(exp.groups, group_labels(exp.groups)):
            group.label = label
    return experiments


def group_labels(groups: list[Group]) -> list[str]:
    """What tells each group apart from the others: the sections and keys whose values differ
    (all of the strategy when there is one group or nothing differs); folder names as a last
    resort, for runs with no config."""
    varying = [k for k in _keys(groups) if len({_canon(g.config.get(k)) for g in groups}) > 1]
    labels = []
    for group in groups:
        if not group.config:
            labels.append(run_labels([r["path"] for r in group.runs])[0])
            continue
        parts = [_describe(key, group.config.get(key), [g.config.get(key) for g in groups])
                 for key in varying]
        labels.append(" · ".join(parts) or section_label(group.config.get("strategy")))
    counts = Counter(labels)
    return [f"{label} [{i}]" if counts[label] > 1 else label for i, label in enumerate(labels)]


def _keys(groups: list[Group]) -> list[str]:
    keys: list[str] = []
    for group in groups:
        keys += [k for k in group.config if k not in keys]
    return keys


def _describe(key: str, value: Any, others: list[Any]) -> str:
    """A pluggable section as ``ewc (lambda=1000.0)``; a fixed one by its differing leaves."""
    if isinstance(value, dict) and ("name" in value or "plugin" in value):
        return section_label(value)
    if isinstance(value, dict):
        subkeys = sorted({k for o in others if isinstance(o, dict) for k in o} | set(value), key=str)
        diff = [k for k in subkeys
                if len({_canon(o.get(k) if isinstance(o, dict) else None) for o in others}) > 1]
        return ", ".join(f"{key}.{k}={value.get(k)}" for k in diff)
    return str(value) if key == "name" else f"{key}={value}"


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


# ---------------------------------------------------------------- statistics and tables

def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof = 1; None with fewer than two values)."""
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def fmt_mean_std(values: list[float], fmt=fmt_percent) -> str:
    """``53.33 ± 2.10`` (std omitted for a single value); '-' when there is none."""
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    return fmt(mean) if std is None else f"{fmt(mean)} ± {fmt(std)}"


Column = tuple[str, str, Any]  # metrics key, title, formatter


def metric_columns(runs: list[dict[str, Any]]) -> list[Column]:
    """The metrics to show: head/medium/tail and the federated ones only when some run has them."""
    columns = [(key, title, fmt_percent) for key, title in COLUMNS]
    if any(r["metrics"].get(key) is not None for r in runs for key, _ in GROUP_COLUMNS):
        columns += [(key, title, fmt_percent) for key, title in GROUP_COLUMNS]
    if any("communication_bytes" in r["metrics"] for r in runs):
        columns += FEDERATED_COLUMNS
    return columns


def read_runs(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """``read_run`` of each folder, a federated run's metrics gaining the flat figures of
    :func:`federated_figures` (the tables average flat numbers)."""
    runs = [read_run(d) for d in run_dirs]
    for r in runs:
        r["metrics"].update(federated_figures(r["metrics"]))
    return runs


def federated_figures(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat numbers of a federated run's metrics.json (none for a local run)."""
    if "communication_bytes" not in metrics:
        return {}
    clients = [a for a in metrics.get("mean_client_accuracy") or [] if _number(a)]
    return {"communication_mb": metrics["communication_bytes"]["total"] / 1e6,
            "final_client_accuracy": clients[-1] if clients else None,
            "simulated_time_s": metrics.get("simulated_time_s")}


def group_table(exp: Experiment, columns: list[Column]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one experiment's mean ± std table."""
    header = ["group", *(title for _, title, _ in columns), "wall time (s)", "seeds"]
    rows = [[g.label, *(fmt_mean_std(g.values(key), fmt) for key, _, fmt in columns),
             fmt_mean_std(g.values("wall_time_s"), fmt_seconds), str(len(g.runs))]
            for g in exp.groups]
    return header, rows


def run_table(runs: list[dict[str, Any]], labels: list[str],
              columns: list[Column]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the one-row-per-run table."""
    header = ["run", "strategy", "model", "seed", *(title for _, title, _ in columns), "wall time (s)"]
    rows = [[label, section_label(r["config"].get("strategy")), _name(r["config"].get("model")),
             str(r["config"].get("seed", "-")),
             *(fmt(r["metrics"].get(key)) for key, _, fmt in columns),
             fmt_seconds(r["metrics"].get("wall_time_s"))]
            for label, r in zip(labels, runs)]
    return header, rows


def _name(section: Any) -> str:
    """A section's registered name (or plugin); its arguments would make a column too wide."""
    return section_label({"name": section.get("name"), "plugin": section.get("plugin")}
                         if isinstance(section, dict) else section)


def comparison_table(runs: list[dict[str, Any]], labels: list[str]) -> str:
    """The one-row-per-run markdown table for runs loaded by ``read_run``."""
    return md_table(*run_table(runs, labels, metric_columns(runs)))


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


# ---------------------------------------------------------------- figures

def curve_panels(experiments: list[Experiment]) -> dict[str, dict[str, tuple[list, list]]]:
    """Per experiment, per group: mean and std over seeds of the average accuracy over seen
    experiences after each experience (runs cut to the group's shortest stream)."""
    panels = {}
    for exp in experiments:
        panel = {}
        for g in exp.groups:
            curves = [seen_accuracy(r["metrics"]["accuracy_matrix"]) for r in g.runs]
            T = min(len(c) for c in curves)
            stack = np.array([c[:T] for c in curves], dtype=np.float64)  # (seeds, T)
            std = stack.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(T)
            panel[g.label] = (stack.mean(axis=0).tolist(), std.tolist())
        panels[exp.name] = panel
    return panels


def bar_panels(experiments: list[Experiment], key: str = "forgetting") -> dict[str, dict[str, tuple]]:
    """Per experiment, per group: (mean, std) of ``key`` over seeds (std 0 for one seed)."""
    panels = {}
    for exp in experiments:
        panel = {}
        for g in exp.groups:
            mean, std = mean_std(g.values(key))
            panel[g.label] = (mean, std or 0.0)
        panels[exp.name] = panel
    return panels


# ---------------------------------------------------------------- the report

def compare_runs(run_dirs: list[Path], out_dir: Path) -> str:
    """Compare finished runs; write ``comparison.md``, ``comparison.png``, ``forgetting.png`` and
    ``index.html`` into ``out_dir``. Returns the markdown tables (per-group mean ± std, then one
    row per run). Raises :class:`ConfigError` when a folder is not a finished run.
    """
    from clsim.report.html import comparison_html

    if not run_dirs:
        raise ConfigError("", "nothing to compare: give at least one run folder")
    runs = read_runs(run_dirs)
    experiments = group_runs(runs)
    columns = metric_columns(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"comparison.png": plots.mean_curves_png(curve_panels(experiments)),
               "forgetting.png": plots.bars_png(bar_panels(experiments), ylabel="forgetting",
                                                title="Forgetting")}
    for name, data in figures.items():
        atomic_write_bytes(out_dir / name, data)
    tables = {exp.name: group_table(exp, columns) for exp in experiments}
    labels = run_labels([r["path"] for r in runs])
    per_run = run_table(runs, labels, columns)
    figure_md = [f"![{alt}]({name})" for name, alt in FIGURES]
    atomic_write_text(out_dir / "comparison.md", f"# Comparison of {len(runs)} runs\n\n"
                      + tables_markdown(tables, per_run, figure_md) + "\n")
    title = f"clsim comparison of {len(runs)} runs"
    atomic_write_text(out_dir / "index.html", comparison_html(
        title=title, tables=tables, per_run=per_run,
        figures=[(alt, figures[name]) for name, alt in FIGURES]))
    return tables_markdown(tables, per_run)


def tables_markdown(tables: dict[str, tuple[list[str], list[list[str]]]],
                    per_run: tuple[list[str], list[list[str]]], figures: list[str] = ()) -> str:
    """One mean ± std table per experiment, the ``figures`` (markdown images), then every run."""
    parts = []
    for name, (header, rows) in tables.items():
        parts += [f"## {name}", md_table(header, rows)]
    parts += ["Mean ± sample standard deviation over seeds (n - 1 in the denominator).",
              *figures, "## All runs", md_table(*per_run)]
    return "\n\n".join(parts)
