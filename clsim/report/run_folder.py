"""Write and read the run folder (DESIGN.md, "Run folder"); its file names are defined here only.

Every file is written atomically (temp file in the same folder, fsync, ``os.replace``), so a
crash or a kill never leaves a half-written file. ``metrics.json`` is written last: its
presence is what marks a run folder as finished (:func:`read_run`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from clsim.atomic import atomic_write_bytes, atomic_write_text
from clsim.errors import ConfigError
import clsim.report.plots as plots
from clsim.report.markdown import md_cell, md_table  # noqa: F401  (re-exported for compare)

CONFIG = Path("config.yaml")  # the resolved config, enough to rerun the experiment exactly
METRICS = Path("metrics.json")  # written last: its presence marks a finished run
CHECKPOINT = Path("checkpoints") / "last.pt"  # what ``clsim run --resume`` continues from
CLIENT_STATE = Path("federated") / "clients"  # federated clients' strategy state (default place)

PERCENT_METRICS = (
    ("average_accuracy", "average accuracy"),
    ("average_incremental_accuracy", "average incremental accuracy"),
    ("forgetting", "forgetting (max-based, Chaudhry et al.)"),
    ("forgetting_first_last", "forgetting (first - last, Avalanche)"),
    ("forgetting_stepwise", "forgetting (mean step-wise drop, CODA-Prompt)"),
    ("bwt", "backward transfer (BWT)"),
    ("fwt", "forward transfer (FWT)"),
    ("head_accuracy", "head accuracy"),
    ("medium_accuracy", "medium accuracy"),
    ("tail_accuracy", "tail accuracy"),
)


# ---------------------------------------------------------------- atomic writes

def to_jsonable(obj: Any) -> Any:
    """``obj`` with NaN / infinities as ``None``, numpy values as Python ones, tuples as lists.

    Floats keep full precision (``json`` writes the shortest repr that round-trips). NaN is not
    valid JSON, and an unmeasured or undefined number is ``null`` in ``metrics.json``.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON; NaN and infinities become ``null``."""
    # Serialise first, so an unserialisable value fails before any file is touched.
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False)
    atomic_write_text(path, text + "\n")


# ---------------------------------------------------------------- run folder

def check_run_dir(config: Any, out_dir: Path, *, resume: bool) -> None:
    """Refuse a folder that is a file, an earlier run (without resume), or another config.

    ``config`` is an :class:`~clsim.config.ExperimentConfig`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(str(out_dir), "--out names a file, expected a folder for the run")
    has_run = (out_dir / METRICS).exists() or (out_dir / CHECKPOINT).exists()
    if has_run and not resume:
        raise ConfigError(str(out_dir), "already holds a run; pass --resume to continue it or choose another --out")
    config_file = out_dir / CONFIG
    if resume and config_file.exists():
        from clsim.config import parse_config

        saved = parse_config(yaml.safe_load(config_file.read_text())).to_dict()
        # tracking changes no number: a resumed run may switch it on or off
        diff = first_difference(saved | {"report": None}, config.to_dict() | {"report": None})
        if diff:
            raise ConfigError("--resume", f"config differs from {config_file} at '{diff}'; "
                                          f"resume with the same config or choose another --out")


def write_config(config: Any, out_dir: Path) -> None:
    """``config.yaml``: the resolved config, enough to rerun the experiment exactly."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(str(out_dir), f"cannot create the run folder ({exc.strerror})")
    atomic_write_text(out_dir / CONFIG, yaml.safe_dump(config.to_dict(), sort_keys=False))


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The first key path where two nested mappings differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
            if found:
                return found
        return None
    return None if a == b else prefix or "<root>"


def write_results(run_dir: str | Path, *, config: dict, metrics: dict,
                  experiences: list[dict], title: str) -> None:
    """Write ``metrics.json``, ``accuracy_matrix.csv``, ``curves.png``, ``accuracy_matrix.png``
    and ``report.md`` into ``run_dir`` (created if needed). ``config.yaml`` is not written here.

    ``metrics`` has the :func:`clsim.metrics.summarize` keys plus e.g. ``wall_time_s`` and is
    written as given; ``config`` is the resolved config dict; ``experiences`` is a list of
    ``{"index": i, "classes": [...]}``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    R = metrics["accuracy_matrix"]
    atomic_write_text(run_dir / "accuracy_matrix.csv", matrix_csv(R))
    atomic_write_bytes(run_dir / "curves.png", plots.curves_png(R, title=f"{title}: accuracy",
                                                               rounds=metrics.get("rounds")))
    atomic_write_bytes(run_dir / "accuracy_matrix.png",
                       plots.matrix_png(R, title=f"{title}: accuracy matrix (%)"))
    atomic_write_text(run_dir / "report.md", report_markdown(
        config=config, metrics=metrics, experiences=experiences, title=title))
    atomic_write_json(run_dir / METRICS, metrics)  # last: marks the run as finished


def matrix_csv(R: list[list[float | None]]) -> str:
    """``R`` as CSV: header ``after_experience,exp_0,...``; full-precision floats; empty cell for
    an unmeasured entry."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["after_experience", *(f"exp_{j}" for j in range(len(R)))])
    for i, row in enumerate(R):
        writer.writerow([i, *("" if _missing(v) else repr(float(v)) for v in row)])
    return buf.getvalue()


# The single numbers of metrics.json that ``clsim report`` shows (a run may lack any of them).
REPORTED_NUMBERS = ("average_accuracy", "average_incremental_accuracy", "forgetting", "bwt",
                    "head_accuracy", "medium_accuracy", "tail_accuracy", "wall_time_s",
                    "simulated_time_s")


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """Load a finished run folder: ``{"name", "path", "metrics", "config"}``.

    ``config`` is ``{}`` when ``config.yaml`` is absent. Raises :class:`ConfigError` when the
    folder is not a finished clsim run (no ``metrics.json``) or its files cannot be parsed.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(str(run_dir), "not a folder: give a run folder")
    if not run_dir.is_dir():
        raise ConfigError(str(run_dir), "no such run folder")
    metrics_path = run_dir / METRICS
    if not metrics_path.is_file():
        raise ConfigError(str(run_dir), "not a finished clsim run folder (no metrics.json)")
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(str(metrics_path), f"not valid JSON ({e})") from None
    if not isinstance(metrics, dict) or "accuracy_matrix" not in metrics:
        raise ConfigError(str(metrics_path), "expected a JSON object with an 'accuracy_matrix'")
    return {"name": run_dir.name, "path": run_dir, "metrics": _checked_metrics(metrics, metrics_path),
            "config": _read_config(run_dir / CONFIG)}


def _checked_metrics(metrics: dict[str, Any], path: Path) -> dict[str, Any]:
    """``metrics`` with what the report computes on checked: the accuracy matrix (T x T, numbers
    on and below the diagonal) and ``communication_bytes`` raise a :class:`ConfigError` naming
    ``path`` when malformed; any other value that is not a number counts as missing."""
    from clsim.metrics import _size

    R = metrics["accuracy_matrix"]
    try:
        if not isinstance(R, list) or not all(isinstance(row, list) for row in R):
            raise ValueError("accuracy matrix must be a list of rows")
        _size(R)
        if not all(_is_number(v) or (v is None and j > i)
                   for i, row in enumerate(R) for j, v in enumerate(row)):
            raise ValueError("accuracy matrix entries must be numbers (null above the diagonal)")
    except ValueError as e:
        raise ConfigError(f"{path}: accuracy_matrix", str(e)) from None
    comm = metrics.get("communication_bytes", {"total": 0})
    if not isinstance(comm, dict) or not _is_number(comm.get("total")):
        raise ConfigError(f"{path}: communication_bytes",
                          f"expected an object with a numeric 'total', got {comm!r}"[:200])
    clean = metrics | {k: None for k in REPORTED_NUMBERS if not _is_number(metrics.get(k))}
    if not isinstance(metrics.get("mean_client_accuracy", []), list):
        clean["mean_client_accuracy"] = None
    return clean


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(str(path), f"not valid YAML ({e})") from None
    return config if isinstance(config, dict) else {}


# ---------------------------------------------------------------- report.md

def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def fmt_percent(v: float | None) -> str:
    """A fraction as a percentage with 2 decimals; '-' when not available."""
    return "-" if _missing(v) else f"{100 * v:.2f}"


def fmt_seconds(v: float | None) -> str:
    """Seconds with 1 decimal; '-' when not available."""
    return "-" if _missing(v) else f"{v:.1f}"


def section_label(section: Any) -> str:
    """A config section as one line: ``ewc (lambda=100)``; ``-`` when absent."""
    if not isinstance(section, dict):
        return "-" if section is None else str(section)
    head = section.get("plugin") or section.get("name") or "?"
    if section.get("plugin") and section.get("name"):  # a strategy's own plugin argument (avalanche)
        head = f"{section['name']} {section['plugin']}"
    kwargs = ", ".join(f"{k}={v}" for k, v in section.items() if k not in ("name", "plugin"))
    return f"{head} ({kwargs})" if kwargs else str(head)


def report_markdown(*, config: dict, metrics: dict, experiences: list[dict],
                    title: str) -> str:
    """The text of ``report.md``."""
    parts = [f"# {title}", _config_summary(config), "## Results", _metrics_table(metrics),
             "## Accuracy matrix (%)",
             "Row *i*: after training experience *i*; column *j*: test set of experience *j*.",
             _matrix_table(metrics["accuracy_matrix"]),
             "![accuracy over the stream](curves.png)",
             "![accuracy matrix](accuracy_matrix.png)",
             "## Experiences", _experience_list(experiences)]
    if metrics.get("definitions"):
        parts += ["## Metric definitions", _definitions_list(metrics["definitions"])]
    if metrics.get("rounds"):  # a federated run (clsim.federated)
        from clsim.report.federation import federation_markdown

        parts[4:4] = ["## Federation", federation_markdown(metrics)]
    return "\n\n".join(parts) + "\n"


def _config_summary(config: dict) -> str:
    train = config.get("train") or {}
    lines = [("data", section_label(config.get("data"))),
             ("scenario", section_label(config.get("scenario"))),
             ("model", section_label(config.get("model"))),
             ("strategy", section_label(config.get("strategy"))),
             ("epochs per experience", train.get("epochs", "-")),
             ("seed", config.get("seed", "-"))]
    return "\n".join(f"- **{key}**: `{value}`" for key, value in lines)


def _metrics_table(metrics: dict) -> str:
    rows = [[f"{label} (%)", fmt_percent(metrics.get(key))] for key, label in PERCENT_METRICS]
    rows.append(["wall time (s)", fmt_seconds(metrics.get("wall_time_s"))])
    # Extra scalar entries (rounds, communication_bytes, ...) are shown as they are.
    known = {key for key, _ in PERCENT_METRICS} | {"wall_time_s", "accuracy_matrix", "definitions"}
    rows += [[key, "-" if _missing(v) else v] for key, v in metrics.items()
             if key not in known and (v is None or isinstance(v, (int, float, str)))]
    return md_table(["metric", "value"], rows)


def _definitions_list(definitions: dict) -> str:
    """One line per metric: the formula and the reference it follows (``metrics.json``)."""
    return "\n".join(f"- `{key}`: {text}" for key, text in definitions.items())


def _matrix_table(R: list[list[float | None]]) -> str:
    header = ["after \\ on", *(f"exp {j}" for j in range(len(R)))]
    return md_table(header, [[f"exp {i}", *(fmt_percent(v) for v in row)]
                             for i, row in enumerate(R)])


def _experience_list(experiences: list[dict]) -> str:
    if not experiences:
        return "(none recorded)"
    return "\n".join(f"- experience {e.get('index', k)} ({len(e.get('classes', []))} classes): "
                     + ", ".join(str(c) for c in e.get("classes", []))
                     for k, e in enumerate(experiences))
