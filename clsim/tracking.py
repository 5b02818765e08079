"""Optional experiment tracking: TensorBoard event files and MLflow runs (``report:`` section).

Neither tool is needed for a plain run, and neither is imported unless the config asks for it
(``report: {tensorboard: true}``, ``report: {mlflow: true}``), so a plain run starts as fast as
before. A tracker only records; it never changes what the run computes.

What is logged (TensorBoard tag / MLflow metric key):

- ``train/loss_step``: the loss of every optimisation step (x: the run's step count);
- ``train/loss``: the last epoch's mean loss of each experience (x: experience index);
- ``eval/accuracy_exp_J``: accuracy on experience J's test set after each experience (a column
  of the accuracy matrix), ``eval/accuracy_seen``: their mean over the experiences seen so far;
- ``accuracy_matrix``: the matrix as an image and a markdown table (TensorBoard), as a JSON
  artifact with the run folder's files (MLflow);
- ``summary/KEY``: every scalar of ``metrics.json`` at the end (average accuracy, the three
  forgetting variants, BWT, ...).
"""

from __future__ import annotations

import importlib.util
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clsim.config.schema import ReportConfig
from clsim.errors import ConfigError

Row = Sequence[float | None]


class Tracker:
    """Receives a run's numbers as they appear; the base class records nothing."""

    def log_step(self, step: int, loss: float) -> None:
        """One optimisation step's loss; ``step`` counts steps over the whole run."""

    def log_experience(self, index: int, *, loss: float, row: Row) -> None:
        """After experience ``index``: its last-epoch mean loss and its accuracy-matrix row."""

    def log_summary(self, metrics: dict[str, Any], run_dir: Path) -> None:
        """The finished run's ``metrics.json`` content; ``run_dir`` holds its files."""

    def close(self) -> None:
        """Flush and release; called once, also when the run fails."""


class Trackers(Tracker):
    """Several trackers behind one interface."""

    def __init__(self, trackers: Sequence[Tracker]):
        self.trackers = list(trackers)

    def log_step(self, step: int, loss: float) -> None:
        for t in self.trackers:
            t.log_step(step, loss)

    def log_experience(self, index: int, *, loss: float, row: Row) -> None:
        for t in self.trackers:
            t.log_experience(index, loss=loss, row=row)

    def log_summary(self, metrics: dict[str, Any], run_dir: Path) -> None:
        for t in self.trackers:
            t.log_summary(metrics, run_dir)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


TENSORBOARD_MISSING = ("needs the 'tensorboard' package: pip install 'clsim[tracking]' "
                       "(or pip install tensorboard)")
MLFLOW_MISSING = "needs the 'mlflow' package: pip install mlflow (or mlflow-skinny)"
NO_MLFLOW_URI = ("MLflow needs a tracking URI: set report.mlflow_uri (e.g. sqlite:///mlflow.db) "
                 "or MLFLOW_TRACKING_URI")


def check_report(report: ReportConfig) -> None:
    """The tools ``report`` asks for are installed and MLflow has a tracking URI.

    Called by ``parse_config``, so ``clsim validate`` and a sweep's pre-check catch it, not the
    end of a federated run. Only looks the packages up (``find_spec``, no import: importing
    MLflow takes seconds).
    """
    if report.tensorboard and not (_installed("tensorboard") and _installed("torch.utils.tensorboard")):
        raise ConfigError("report.tensorboard", TENSORBOARD_MISSING)
    if report.mlflow and not _installed("mlflow"):
        raise ConfigError("report.mlflow", MLFLOW_MISSING)
    if report.mlflow and not (report.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise ConfigError("report.mlflow_uri", NO_MLFLOW_URI)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module blocked in sys.modules
        return False


def open_trackers(report: ReportConfig, run_dir: Path, *, name: str, params: dict[str, Any]) -> Tracker:
    """The trackers ``report`` asks for (a do-nothing :class:`Tracker` when none).

    Raises :class:`ConfigError` naming the ``report`` key when a requested tool is missing or
    not configured, before any training starts.
    """
    check_report(report)
    trackers: list[Tracker] = []
    try:
        if report.tensorboard:
            trackers.append(TensorBoardTracker(Path(run_dir) / "tensorboard"))
        if report.mlflow:
            trackers.append(MLflowTracker(report, Path(run_dir), name=name, params=params))
    except BaseException:
        for tracker in trackers:  # an MLflow failure must not leave TensorBoard's writer open
            tracker.close()
        raise
    return Trackers(trackers) if trackers else Tracker()


def seen_mean(row: Row) -> float:
    """Mean accuracy over the measured entries of a row (the experiences seen so far)."""
    return float(np.mean([a for a in row if a is not None]))


def summary_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The plain numbers of ``metrics.json`` (nested entries, lists and nulls left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}


def matrix_markdown(matrix: Sequence[Row]) -> str:
    """The accuracy matrix as a markdown table of percentages (TensorBoard renders markdown)."""
    T = len(matrix)
    lines = ["| after \\ on | " + " | ".join(f"exp {j}" for j in range(T)) + " |",
             "|---" * (T + 1) + "|"]
    for i, row in enumerate(matrix):
        cells = ["-" if a is None else f"{100 * a:.2f}" for a in row]
        lines.append(f"| exp {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ TensorBoard


class TensorBoardTracker(Tracker):
    """Event files under ``log_dir`` (``tensorboard --logdir RUN/tensorboard``)."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            raise ConfigError("report.tensorboard", TENSORBOARD_MISSING) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.rows: list[list[float | None]] = []

    def log_step(self, step: int, loss: float) -> None:
        self.writer.add_scalar("train/loss_step", loss, step)

    def log_experience(self, index: int, *, loss: float, row: Row) -> None:
        self.writer.add_scalar("train/loss", loss, index)
        for j, accuracy in enumerate(row):
            if accuracy is not None:
                self.writer.add_scalar(f"eval/accuracy_exp_{j}", accuracy, index)
        self.writer.add_scalar("eval/accuracy_seen", seen_mean(row), index)
        self.writer.flush()

    def log_summary(self, metrics: dict[str, Any], run_dir: Path) -> None:
        matrix = metrics["accuracy_matrix"]
        last = len(matrix) - 1
        for key, value in summary_scalars(metrics).items():
            self.writer.add_scalar(f"summary/{key}", value, last)
        self.writer.add_text("accuracy_matrix", matrix_markdown(matrix), last)
        self.writer.add_image("accuracy_matrix", _matrix_image(matrix), last, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _matrix_image(matrix: Sequence[Row]) -> np.ndarray:
    """``(H, W, 3)`` uint8: the run folder's accuracy-matrix heat map, decoded."""
    from PIL import Image  # matplotlib's own dependency

    import clsim.report.plots as plots

    png = plots.matrix_png([list(r) for r in matrix], title="accuracy matrix (%)")
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


# ----------------------------------------------------------------------------------- MLflow


RUN_ID_FILE = "mlflow_run_id"


class MLflowTracker(Tracker):
    """One MLflow run per clsim run: the flattened config as parameters, metrics by step.

    The MLflow run's id is saved in the run folder (``RUN/mlflow_run_id``), so a resumed run
    (``--resume``) continues the same MLflow run instead of opening a second one next to the
    killed run, which would stay RUNNING.
    """

    def __init__(self, report: ReportConfig, run_dir: Path, *, name: str, params: dict[str, Any]):
        try:
            import mlflow
        except ImportError:
            raise ConfigError("report.mlflow", MLFLOW_MISSING) from None
        uri = report.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ConfigError("report.mlflow_uri", NO_MLFLOW_URI)
        self.mlflow = mlflow
        id_file = Path(run_dir) / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        try:
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(report.mlflow_experiment or name)
            self.run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=name)
        except Exception as exc:  # a bad URI or an unreachable server: MLflow raises many kinds
            raise ConfigError("report.mlflow_uri", f"MLflow cannot use '{uri}': {_first_line(exc)}") from None
        if run_id:
            return  # the parameters were logged by the first process (MLflow refuses to change them)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run.info.run_id + "\n")
        flat = flatten(params)
        # MLflow caps a batch at 100 parameters
        keys = sorted(flat)
        for start in range(0, len(keys), 100):
            mlflow.log_params({k: flat[k] for k in keys[start : start + 100]})

    def log_step(self, step: int, loss: float) -> None:
        self.mlflow.log_metric("train/loss_step", loss, step=step)

    def log_experience(self, index: int, *, loss: float, row: Row) -> None:
        values = {"train/loss": loss, "eval/accuracy_seen": seen_mean(row)}
        values |= {f"eval/accuracy_exp_{j}": a for j, a in enumerate(row) if a is not None}
        self.mlflow.log_metrics(values, step=index)

    def log_summary(self, metrics: dict[str, Any], run_dir: Path) -> None:
        last = len(metrics["accuracy_matrix"]) - 1
        self.mlflow.log_metrics({f"summary/{k}": v for k, v in summary_scalars(metrics).items()}, step=last)
        self.mlflow.log_dict({"accuracy_matrix": metrics["accuracy_matrix"]}, "accuracy_matrix.json")
        for name in ("metrics.json", "report.md", "accuracy_matrix.csv", "config.yaml", "curves.png"):
            if (Path(run_dir) / name).is_file():
                self.mlflow.log_artifact(str(Path(run_dir) / name))

    def close(self) -> None:
        self.mlflow.end_run()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config ``{"train": {"lr": 0.1}}`` -> ``{"train.lr": "0.1"}`` (MLflow parameters)."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: str(tree)[:500]}  # MLflow limits a parameter value's length
