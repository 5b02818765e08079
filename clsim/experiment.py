"""Run one experiment: config -> :class:`~clsim.learner.Learner` over the stream -> run folder.

:func:`run` reads like a table of contents; each step is a small function below it. A run with
a ``federated:`` section hands the stream to :mod:`clsim.federated`; everything else is the
local loop here: experience by experience, a checkpoint after each.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clsim.config import ExperimentConfig
from clsim.engine.checkpoint import RunState, load_checkpoint, save_checkpoint
from clsim.engine.progress import Progress
from clsim.learner import Learner, finish, record_row
from clsim.report.run_folder import CHECKPOINT, check_run_dir, write_config
from clsim.teacher import load_teacher, save_snapshot, train_teacher


def run(config: ExperimentConfig, out_dir: Path, *, resume: bool = False, quiet: bool = False,
        keep_models: bool = False) -> dict[str, Any]:
    """Run ``config`` into ``out_dir`` and return its metrics (see DESIGN.md, "Run folder").

    ``keep_models`` also saves the model after every experience
    (``checkpoints/experience_N.pt``), so the run can serve as a teacher (:mod:`clsim.teacher`).
    """
    out_dir = Path(out_dir)
    check_run_dir(config, out_dir, resume=resume)
    # The checkpoint is read before anything is written: a corrupt one leaves the folder as it was.
    saved = read_checkpoint(out_dir) if resume and config.federated is None else None
    # Tracking opens next: an unusable MLflow URI fails before a teacher or a federation trains.
    with tracking(config, out_dir) as tracker:
        if config.federated is None:
            return run_local(config, out_dir, tracker, saved=saved, quiet=quiet, keep_models=keep_models)
        from clsim import federated  # a federation learns the stream (clsim.federated, on Flower)

        results = federated.run(config, out_dir, resume=resume, quiet=quiet)
        log_finished(tracker, out_dir, results)
        return results


def run_local(config: ExperimentConfig, out_dir: Path, tracker: Any, *, saved: dict[str, Any] | None,
              quiet: bool, keep_models: bool) -> dict[str, Any]:
    """The local loop of :func:`run`: teacher, then experience by experience with checkpoints,
    continuing from ``saved`` (a :func:`read_checkpoint` payload) when resuming."""
    teacher_dir = train_teacher(config, out_dir, quiet=quiet, run=run)  # first, into out_dir/teacher
    with Progress(quiet=quiet) as progress:
        learner = Learner.build(config, progress)
        learner.teacher = load_teacher(config, teacher_dir, learner.scenario, learner.engine.device)
        state = restore(learner, saved) if saved is not None else RunState()
        write_config(config, out_dir)
        learner.engine.on_step = step_logger(tracker, state) if config.report.enabled else None
        started = time.perf_counter()
        for exp in learner.scenario.experiences[state.next_experience :]:
            train_and_evaluate(learner, exp.index, state)
            tracker.log_experience(exp.index, loss=state.losses[-1], row=state.rows[-1])
            state.elapsed_s += time.perf_counter() - started
            started = time.perf_counter()
            if keep_models:  # before last.pt: a run resumed past experience N has its snapshot
                save_snapshot(out_dir, exp.index, learner.model)
            save_checkpoint(out_dir / CHECKPOINT, state=state, model=learner.model,
                            strategy_state=learner.strategy.state_dict())
        results = finish(config, learner, state, out_dir)
        tracker.log_summary(results, out_dir)
        progress.log(f"[bold]done[/] average accuracy {results['average_accuracy']:.4f} -> {out_dir}")
    return results


@contextlib.contextmanager
def tracking(config: ExperimentConfig, out_dir: Path) -> Iterator[Any]:
    """The run's :class:`clsim.tracking.Tracker` (TensorBoard, MLflow), closed on the way out.

    Imported only when the ``report`` section asks for a tool: a plain run loads neither.
    """
    if not config.report.enabled:
        from clsim.tracking import Tracker  # numpy only: the do-nothing base

        yield Tracker()
        return
    from clsim.tracking import open_trackers

    tracker = open_trackers(config.report, out_dir, name=config.name, params=config.to_dict())
    try:
        yield tracker
    finally:
        tracker.close()


def step_logger(tracker: Any, state: RunState):
    """``Engine.on_step``: log each step's loss at the run-wide step count kept in ``state``."""
    def log(loss: float) -> None:
        tracker.log_step(state.train_steps, loss)
        state.train_steps += 1
    return log


def log_finished(tracker: Any, out_dir: Path, results: dict[str, Any]) -> None:
    """Log a finished run's rows and summary at once (federated runs, whose loop is Flower's)."""
    losses = results.get("train_loss") or []
    for index, row in enumerate(results["accuracy_matrix"]):
        loss = losses[index] if index < len(losses) else float("nan")
        tracker.log_experience(index, loss=loss, row=row)
    tracker.log_summary(results, out_dir)


def read_checkpoint(out_dir: Path) -> dict[str, Any] | None:
    """The run folder's last checkpoint (on the CPU), or None when it has none yet."""
    path = out_dir / CHECKPOINT
    return load_checkpoint(path, "cpu") if path.exists() else None


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` (nested dicts, lists, tuples) with every tensor moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def restore(learner: Learner, payload: dict[str, Any]) -> RunState:
    """Load a checkpoint payload into the learner; the run state to continue from."""
    # Grow as the run did, one experience at a time: models with per-task parts (GCAB's task
    # tokens and heads) must be rebuilt task by task, not in one step to the final size.
    learner.grow_to(learner.scenario.seen_classes(payload["run"].next_experience - 1))
    learner.model.load_state_dict(payload["model"])
    learner.strategy.load_state_dict(to_device(payload["strategy"], learner.engine.device))
    learner.engine.progress.log(f"resuming after experience {payload['run'].next_experience - 1}")
    return payload["run"]


def train_and_evaluate(learner: Learner, index: int, state: RunState) -> None:
    """Grow the head, learn experience ``index``, consolidate it, then evaluate a row."""
    scenario = learner.scenario
    exp, past, T = scenario.experiences[index], scenario.experiences[:index], len(scenario)
    learner.grow_to(scenario.seen_classes(index))
    loss, _ = learner.learn(exp, past, label=f"train {index + 1}/{T}")
    learner.consolidate(exp, past)
    results = learner.evaluate(scenario.experiences[: index + 1])
    record_row(state, results, T)
    state.losses.append(loss)
    state.next_experience = index + 1
    learner.engine.progress.log(f"experience {index + 1}/{T}: loss {loss:.4f}, "
                                f"accuracy on seen {np.mean([r.accuracy for r in results]):.4f}")
