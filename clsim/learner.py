"""The experience protocol, once: build, grow, learn, consolidate, evaluate, finish.

:class:`Learner` is the only caller of strategy hooks. A local run (:mod:`clsim.experiment`)
drives it over the stream; a federated client (:mod:`clsim.federated.client`) calls
:meth:`Learner.learn` / :meth:`Learner.consolidate` on its partition of the current
experience; the server (:mod:`clsim.federated.server`) calls :meth:`Learner.grow_to` /
:meth:`Learner.evaluate` on the global model. A one-client federation is therefore the same
code path as a local run, and :func:`summary` gives every run the same metrics.

Seed streams (all named in :mod:`clsim.seeds`): experience ``i``'s head growth and learning
start from ``derive_seed(seed, i)`` (a resumed run draws what an uninterrupted one does), the
engine's batches, dropout and augmentation from their own streams, and ``after_task`` from
``derive_seed(seed, step, AFTER_TASK)``.

This module knows nothing of Flower; :func:`finish` hands the summary to
:mod:`clsim.report.run_folder`, which owns the run folder's layout.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from clsim import metrics as M
from clsim.config.schema import ExperimentConfig
from clsim.engine.engine import Engine, EvalResult, LossTerm
from clsim.engine.param_groups import check_globs
from clsim.engine.progress import Progress
from clsim.report.run_folder import write_results
from clsim.scenarios.base import Experience, Scenario
from clsim.seeds import AFTER_TASK, derive_seed, seed_torch
from clsim.strategies.base import Finetune, Strategy, Task
from clsim.teacher import Teacher


class Record(Protocol):
    """What a run has measured so far (a local :class:`~clsim.engine.checkpoint.RunState`, a
    federated :class:`~clsim.federated.state.FedState`): the fields :func:`record_row` fills
    and :func:`summary` reads."""

    rows: list[list[float | None]]
    final_correct: list[int]
    final_total: list[int]
    variant_rows: dict[str, list[list[float | None]]]
    variant_correct: dict[str, list[int]]
    losses: list[float]
    elapsed_s: float


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; CPU results are then bit-identical run to run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    seed_torch(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class Learner:
    """Everything that trains: the stream, the model, the strategy, the engine (and a teacher)."""

    scenario: Scenario
    model: nn.Module
    strategy: Strategy
    engine: Engine
    teacher: Teacher | None = None  # for strategies that distil from one (``uses_teacher``)

    @classmethod
    def build(cls, config: ExperimentConfig, progress: Progress | None = None, *,
              scenario: Scenario | None = None, model: nn.Module | None = None) -> Learner:
        """Source, scenario, model, strategy and engine from the config, in that order.

        ``scenario`` reuses a stream already built from the same config; ``model`` replaces the
        configured one (a federated client's width-scaled sub-model).
        """
        progress = progress or Progress(quiet=True)
        seed_everything(config.seed)
        if scenario is None:
            scenario = build_scenario(config)
            progress.log(f"{config.name}: {config.data.name if config.data else config.scenario.name}, "
                         f"{len(scenario)} experiences, {scenario.num_classes} classes, "
                         f"strategy {config.strategy.name}")
        engine = Engine(config.train, seed=config.seed, progress=progress)
        if model is None:
            seed_torch(config.seed)
            model = config.model.build(scenario.input_shape)
        model = model.to(engine.device)
        check_globs(model, config.train)  # train.trainable / frozen / lr_scale name real parameters
        strategy = config.strategy.build()
        strategy.setup(model)
        return cls(scenario, model, strategy, engine)

    # ------------------------------------------------------------------ the protocol

    def grow_to(self, num_classes: int) -> None:
        """Grow the head to ``num_classes`` (see :func:`grow_model`), each growth from its
        experience's seed: the new rows are the same however the run got there."""
        grow_model(self.model, self.scenario, num_classes, seed=self.engine.seed)

    def task(self, experience: Experience, past: Sequence[Experience] = ()) -> Task:
        """The :class:`Task` hooks see for ``experience`` (with its teacher, if the run has one)."""
        teacher = self.teacher.for_experience(experience.index) if self.teacher is not None else None
        return Task(experience, tuple(past), self.model.num_classes, teacher)

    def learn(self, experience: Experience, past: Sequence[Experience] = (), *, stream: int | None = None,
              epochs: int | None = None, terms: Sequence[LossTerm] = (), label: str = "train") -> tuple[float, int]:
        """``before_task`` -> its data -> fit; the last epoch's mean loss (NaN: no data) and the
        number of training examples.

        ``stream`` is the seed stream of this training (default: the experience's index, a local
        run's; a federated client's is unique per client and round), ``terms`` extra loss terms.
        """
        stream = experience.index if stream is None else stream
        seed_torch(derive_seed(self.engine.seed, stream))
        data = self.strategy.before_task(self.model, self.task(experience, past))
        if not len(data):
            return float("nan"), 0
        loss = self.engine.fit(self.model, self.strategy, data, experience=stream, label=label,
                               epochs=epochs, terms=terms)
        return loss, len(data)

    def consolidate(self, experience: Experience, past: Sequence[Experience] = (), *,
                    step: int | None = None) -> None:
        """``after_task`` on ``experience``'s training data, from the seed of stream step
        ``step`` (default: its index), so a federated client consolidating it draws what a
        local run draws."""
        if not len(experience.train):
            return
        step = experience.index if step is None else step
        seed_torch(derive_seed(self.engine.seed, step, AFTER_TASK))
        engine = self.engine

        def batches():
            return engine.batches(experience.train, batch_size=engine.train.batch_size)

        self.strategy.after_task(self.model, self.task(experience, past), batches)

    def evaluate(self, experiences: Sequence[Experience], *, model: nn.Module | None = None,
                 strategy: Strategy | None = None) -> list[EvalResult]:
        """Per-class counts of the strategy's prediction (and its variants) on each test set."""
        model, strategy = model or self.model, strategy or self.strategy
        return [self.engine.evaluate(model, strategy, e.test, num_classes=self.scenario.num_classes,
                                     label=f"eval {i + 1}/{len(experiences)}")
                for i, e in enumerate(experiences)]


def grow_model(model: nn.Module, scenario: Scenario, num_classes: int, *, seed: int | None = None) -> None:
    """Grow ``model``'s head to ``num_classes`` one experience at a time: models with per-task
    parts (GCAB's task tokens and heads) are built task by task, as the run met the tasks.
    With ``seed``, each growth starts from ``derive_seed(seed, experience)``."""
    for index in range(len(scenario)):
        seen = scenario.seen_classes(index)
        if seen > num_classes:
            break
        if seen > model.num_classes:
            if seed is not None:
                seed_torch(derive_seed(seed, index))
            model.grow(seen)


def build_scenario(config: ExperimentConfig) -> Scenario:
    """The config's stream: its source (None when the scenario brings its own data), then the scenario."""
    source = config.data.build() if config.data is not None else None
    return config.scenario.build(source, config.seed)


# ---------------------------------------------------------------------- recording and summary

def record_row(state: Record, results: list[EvalResult], T: int) -> None:
    """Append the accuracy-matrix row of ``results`` (test sets 0..len-1 of ``T``) to ``state``,
    with the per-class counts of the latest evaluation and the prediction variants' rows."""
    state.rows.append([r.accuracy for r in results] + [None] * (T - len(results)))
    state.final_correct = sum(r.correct for r in results).tolist()
    state.final_total = sum(r.total for r in results).tolist()
    for name in results[0].variants:
        accuracy = [float(r.variants[name].sum() / max(r.total.sum(), 1)) for r in results]
        state.variant_rows.setdefault(name, []).append(accuracy + [None] * (T - len(results)))
        state.variant_correct[name] = sum(r.variants[name] for r in results).tolist()


def summarize(config: ExperimentConfig, scenario: Scenario, rows: list, correct: list[int],
              total: list[int]) -> dict[str, Any]:
    """:func:`clsim.metrics.summarize` with the run's head/medium/tail settings."""
    per_class = {}
    if scenario.long_tailed and total:
        per_class = {"per_class_correct": correct, "per_class_total": total,
                     "train_counts": scenario.train_counts.tolist()}
    m = config.metrics
    return M.summarize(rows, many_shot=m.many_shot, few_shot=m.few_shot,
                       class_index_cuts=m.class_index_cuts, **per_class)


def evaluate_teacher(config: ExperimentConfig, learner: Learner) -> dict[str, Any]:
    """The final teacher's accuracy on every test set, with head/medium/tail: the distillation's
    upper reference (DeiT-LT reports its teacher next to the student)."""
    scenario = learner.scenario
    teacher = learner.teacher.for_experience(len(scenario) - 1)
    results = learner.evaluate(scenario.experiences, model=teacher, strategy=Finetune())
    row = [r.accuracy for r in results]
    summary = {"average_accuracy": float(np.mean(row)), "head_accuracy": None,
               "medium_accuracy": None, "tail_accuracy": None}
    if scenario.long_tailed:
        m = config.metrics
        split = M.class_groups(scenario.train_counts.tolist(), m.many_shot, m.few_shot, m.class_index_cuts)
        groups = M.group_accuracy(sum(r.correct for r in results), sum(r.total for r in results), split)
        summary |= {f"{g}_accuracy": v for g, v in groups.items()}
    return summary | {"accuracy_per_experience": row}


def summary(config: ExperimentConfig, learner: Learner, state: Record) -> dict[str, Any]:
    """metrics.json of any run: the accuracy matrix's metrics, head/medium/tail, variants,
    the teacher, times, losses, the class order, the device and the package versions."""
    from clsim.versions import package_versions

    scenario = learner.scenario
    results = summarize(config, scenario, state.rows, state.final_correct, state.final_total)
    if state.variant_rows:  # e.g. DeiT's CLS-only and DIST-only heads, scored like the main prediction
        results["variants"] = {name: summarize(config, scenario, rows, state.variant_correct[name],
                                               state.final_total)
                               for name, rows in state.variant_rows.items()}
    if learner.teacher is not None:
        results["teacher"] = evaluate_teacher(config, learner)
    return results | {
        "wall_time_s": round(state.elapsed_s, 3),
        "train_loss": state.losses,
        "class_order": list(scenario.class_order),
        "device": str(learner.engine.device),
        "versions": package_versions(),
    }


def finish(config: ExperimentConfig, learner: Learner, state: Record, out_dir: Path, *,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's :func:`summary` (plus ``extra``: a federation's rounds, bytes, clients),
    written to the run folder; returns the metrics."""
    results = summary(config, learner, state) | (extra or {})
    scenario = learner.scenario
    experiences = [{"index": e.index, "classes": [scenario.class_names[c] for c in e.classes]}
                   for e in scenario.experiences]
    write_results(out_dir, config=config.to_dict(), metrics=results, experiences=experiences, title=config.name)
    return results
