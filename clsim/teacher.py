"""Teachers for distillation strategies: trained first as a clsim run of their own, or loaded.

A strategy with ``uses_teacher`` (DeiT-LT's ``deit_lt``) distils from a model trained on the
same stream. The config's ``teacher:`` section says which (see
:class:`~clsim.config.TeacherConfig`):

- trained: the teacher is an ordinary run on the experiment's data and scenario, into
  ``RUN/teacher`` (its own config.yaml, metrics.json with head/medium/tail, report), which
  also keeps its model after every experience (``checkpoints/experience_N.pt``). The student
  at experience N distils from the teacher as it was after experience N: it never sees a
  class the student has not met. A resumed student finds the finished teacher and does not
  train it again; a teacher killed half-way is resumed like any run.
- loaded: ``checkpoint`` names such a run folder (trained before, e.g. shared by several
  students), or a weights file used for every experience.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch import nn

from clsim.atomic import atomic_write
from clsim.config import ExperimentConfig, parse_config
from clsim.engine.checkpoint import load_file
from clsim.errors import ConfigError
from clsim.scenarios.base import Scenario

TEACHER_DIR = "teacher"
KEY = "teacher.checkpoint"


def snapshot_path(run_dir: Path, index: int) -> Path:
    """Where a run that keeps its models stores the model after experience ``index``."""
    return run_dir / "checkpoints" / f"experience_{index}.pt"


def save_snapshot(run_dir: Path, index: int, model: nn.Module) -> None:
    """Keep the model after experience ``index`` (atomically: a kill never leaves half a file)."""
    path = snapshot_path(run_dir, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(model.state_dict(), f))


def teacher_config(config: ExperimentConfig) -> ExperimentConfig:
    """The teacher's own experiment: the student's data, scenario, seed and metrics."""
    t = config.teacher
    return dataclasses.replace(config, name=f"{config.name}_teacher", model=t.model, strategy=t.strategy,
                               train=t.train, teacher=None)


def train_teacher(config: ExperimentConfig, out_dir: Path, *, quiet: bool,
                  run: Callable[..., dict]) -> Path | None:
    """Train (or finish) the teacher run in ``out_dir/teacher`` unless it is done or loaded.

    Returns the teacher run folder to read snapshots from, or None (no teacher, or a weights
    file). ``run`` is :func:`clsim.experiment.run` (passed in: that module imports this one).
    """
    t = config.teacher
    if t is None:
        return None
    if t.checkpoint is not None:
        path = Path(t.checkpoint).expanduser()
        return path if path.is_dir() else None
    run_dir = out_dir / TEACHER_DIR
    if not (run_dir / "metrics.json").exists():
        run(teacher_config(config), run_dir, resume=run_dir.exists(), quiet=quiet, keep_models=True)
    return run_dir


@dataclasses.dataclass
class Teacher:
    """The teacher models of one run: ``for_experience(i)`` is the frozen teacher after experience i."""

    build: Callable[[], nn.Module]
    scenario: Scenario
    device: torch.device
    run_dir: Path | None = None  # per-experience snapshots of a teacher run
    weights: Path | None = None  # or one weights file for every experience
    payload: dict | None = dataclasses.field(default=None, repr=False)  # ``weights`` as read (load_teacher)

    def for_experience(self, index: int) -> nn.Module:
        model = self.build().to(self.device)
        if self.run_dir is not None:
            for i in range(index + 1):  # grow as the teacher run did, task by task
                model.grow(self.scenario.seen_classes(i))
            # weights-only, never pickle: a teacher run folder or file may come from anyone
            state = load_file(snapshot_path(self.run_dir, index), key=KEY, map_location=self.device)
            source = self.run_dir
        else:
            payload = self.payload if self.payload is not None else read_weights(self.weights, self.device)
            state, source = payload.get("model", payload), self.weights
            model.grow(int(payload.get("num_classes", self.scenario.num_classes)))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[1].strip() if "\n" in str(exc) else str(exc)
            raise ConfigError("teacher.checkpoint", f"{source} does not fit the teacher model: {first}") from None
        return freeze(model)


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with gradients off: a teacher is never trained by its student."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_teacher(config: ExperimentConfig, run_dir: Path | None, scenario: Scenario,
                 device: torch.device) -> Teacher | None:
    """The :class:`Teacher` for ``config`` (None without a teacher section)."""
    t = config.teacher
    if t is None:
        return None
    if run_dir is None:  # a weights file, read now: a bad one fails before the run writes anything
        weights = Path(t.checkpoint).expanduser()
        return Teacher(lambda: t.model.build(scenario.input_shape), scenario, device,
                       weights=weights, payload=read_weights(weights, device))
    model = check_teacher_run(run_dir, scenario) if t.model is None else t.model
    return Teacher(lambda: model.build(scenario.input_shape), scenario, device, run_dir=run_dir)


def read_weights(path: Path, device: torch.device) -> dict:
    """A teacher weights file: a state dict, or a dict with one under ``model`` (as clsim's
    checkpoints have). Read weights-only (:func:`~clsim.engine.checkpoint.load_file`): a file
    that needs pickle, or a truncated one, is a :class:`ConfigError` naming it."""
    payload = load_file(path, key=KEY, map_location=device)
    if not isinstance(payload, dict):
        raise ConfigError(KEY, f"{path} holds a {type(payload).__name__}, expected a state dict "
                               f"(torch.save(model.state_dict(), FILE))")
    return payload


def check_teacher_run(run_dir: Path, scenario: Scenario):
    """The model section of a finished teacher run folder trained on the same stream as ``scenario``."""
    metrics_file, config_file = run_dir / "metrics.json", run_dir / "config.yaml"
    if not metrics_file.exists() or not config_file.exists():
        raise ConfigError("teacher.checkpoint", f"{run_dir.resolve()} is not a finished clsim run "
                                                f"(no metrics.json / config.yaml)")
    order = json.loads(metrics_file.read_text()).get("class_order")
    if order != list(scenario.class_order):
        raise ConfigError("teacher.checkpoint", f"{run_dir} was trained on another class order; train the "
                                                f"teacher on the same data, scenario and seed")
    missing = [i for i in range(len(scenario)) if not snapshot_path(run_dir, i).exists()]
    if missing:
        raise ConfigError("teacher.checkpoint", f"{run_dir} has no model snapshot for experience {missing[0]} "
                                                f"(train it as a teacher: a 'teacher:' section without checkpoint)")
    return parse_config(yaml.safe_load(config_file.read_text())).model
