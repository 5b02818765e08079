"""clsim against Avalanche (avalanche-lib 0.6) running the same EWC experiment.

    python benchmarks/vs_avalanche.py                        # defaults (~3 min on 2 cores)
    python benchmarks/vs_avalanche.py --epochs 1 --repeats 1 # smoke

Same experiment on both sides:

- data: clsim's digits class-incremental scenario (5 experiences x 2 classes, class order by
  the seed); Avalanche gets the very same per-experience tensors, in the same item order and
  with the same learner labels, through ``tensors_benchmark`` (so both Fisher passes, which
  read the training set unshuffled, see the same mini-batches). No augmentation on either side.
- model: the clsim model built through its config (a timm ViT); Avalanche gets a deep copy of
  its backbone under ``avalanche.models.IncrementalClassifier`` (stock masking; the mask is
  a no-op here because labels arrive contiguously). Both heads grow by a fresh
  ``nn.Linear(feature_dim, n)`` whose old rows are copied; the new rows are drawn under the
  same per-experience seed on both sides, so initial weights are identical at every step.
- strategy: EWC, mode separate, mini-batch empirical Fisher averaged over batches, computed in
  eval mode on the experience's training set. Avalanche's penalty is
  ``ewc_lambda * sum F (theta - theta*)^2`` and clsim's ``lambda/2 * sum ...``, so clsim
  runs with ``lambda = 2 * ewc_lambda``; cross-entropy over all head outputs (clsim
  ``mask_past: false``, Avalanche has no such option).
- optimisation: Adam with the same lr, re-created per experience on both sides (Avalanche:
  ``reset_optimizer_state=True``), same epochs and batch size, eval batch size 256.
- evaluation: after each experience, every test set seen so far (the lower triangle of the
  accuracy matrix); Avalanche with an ``EvaluationPlugin`` that only computes per-experience
  accuracy and has no logger (no printing); clsim with silent progress.

Timed: the whole train + eval stream (setup, data and model building excluded), ``--repeats``
times alternating clsim / Avalanche. Each framework shuffles training batches its own way;
repeat ``r`` seeds both shuffles with ``seed + r`` (clsim's engine seed, Avalanche's torch
seed), so the accuracies are means over ``--repeats`` data orders. A further Avalanche run on
clsim's exact batch order (``--shared-order``, on by default) separates implementation
differences from data-order noise: there the two accuracy matrices should coincide.

A third side, ``clsim_avalanche_plugin``, runs Avalanche's own ``EWCPlugin`` inside clsim's
engine through the ``avalanche`` strategy adapter (``clsim/strategies/avalanche.py``, with
``train_mb_size`` = the batch size so its Fisher pass sees the same batches): same batch order
as the clsim side, so its accuracy matrix should match clsim's ``ewc`` (see docs/avalanche.md),
and its time shows
what driving a plugin through the adapter costs.

Prints one JSON object on stdout; progress goes to stderr. Targets: clsim >= 2x faster,
final average accuracy within 2 points.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from clsim import metrics as M  # noqa: E402
from clsim.config import ExperimentConfig, Section, parse_config, parse_section  # noqa: E402
from clsim.engine.checkpoint import RunState  # noqa: E402
from clsim.engine.engine import Engine, derive_seed  # noqa: E402
from clsim.engine.progress import Progress  # noqa: E402
from clsim.experiment import train_and_evaluate  # noqa: E402
from clsim.learner import Learner  # noqa: E402
from clsim.registry import STRATEGIES  # noqa: E402

SPEEDUP_TARGET = 2.0
ACCURACY_TARGET_POINTS = 2.0
HEAD_STREAM = 2_000_003  # derive_seed tag of the head-growth draws (distinct from clsim's own)


Seconds = tuple[float, float]  # (wall-clock, this process's CPU time)


def log(message: str) -> None:
    """Progress lines go to stderr; stdout carries only the JSON result."""
    print(message, file=sys.stderr, flush=True)


def clock() -> Seconds:
    """Now, on the wall clock and on this process's CPU clock."""
    return time.perf_counter(), time.process_time()


def since(start: Seconds) -> Seconds:
    """``(wall, cpu)`` seconds elapsed since ``start``."""
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["digits"], default="digits",
                        help="the stream (digits: 5 experiences x 2 classes, bundled with scikit-learn)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per experience")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs of each framework (median time; mean accuracy over their data orders)")
    parser.add_argument("--batch-size", type=int, default=16, help="training mini-batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--ewc-lambda", type=float, default=5000.0,
                        help="Avalanche's ewc_lambda; clsim runs with lambda = 2 * this")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: stable on a shared 2-core machine)")
    parser.add_argument("--seed", type=int, default=0, help="experiment seed (class order, init, batches)")
    parser.add_argument("--shared-order", action=argparse.BooleanOptionalAction, default=True,
                        help="also run Avalanche once on clsim's exact batch order (accuracy check)")
    return parser.parse_args(argv)


def clsim_config(args: argparse.Namespace) -> ExperimentConfig:
    """The clsim experiment: quickstart's ViT on digits, EWC with lambda = 2 * ewc_lambda."""
    return parse_config({
        "name": "vs_avalanche", "seed": args.seed,
        "data": {"name": "digits", "shift": 0},  # no augmentation: Avalanche gets raw tensors
        "scenario": {"name": "class_incremental", "n_tasks": 5},
        "model": {"name": "vit", "embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0},
        "strategy": {"name": "ewc", "lambda": 2 * args.ewc_lambda, "mode": "separate", "mask_past": False,
                     "fisher": "batch_mean"},  # Avalanche's estimator
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                  "optimizer": "adam", "eval_batch_size": 256},
    })


@dataclass
class Setup:
    """What both frameworks start from."""

    config: ExperimentConfig
    learner: Learner  # its model is never trained; runs deep-copy it
    train: list[tuple[torch.Tensor, torch.Tensor]]  # per experience, clsim's item order
    test: list[tuple[torch.Tensor, torch.Tensor]]


def all_items(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``(x, y)`` of a clsim in-memory data set, in its own order."""
    return dataset.get_batch(torch.arange(len(dataset)))


def prepare(args: argparse.Namespace) -> Setup:
    """Build the clsim learner once and extract the tensors Avalanche will see."""
    config = clsim_config(args)
    learner = Learner.build(config, Progress(quiet=True))
    exps = learner.scenario.experiences
    return Setup(config, learner, [all_items(e.train) for e in exps], [all_items(e.test) for e in exps])


def head_seed(setup: Setup, experience: int) -> int:
    """The seed under which the head rows for ``experience``'s classes are drawn (both sides)."""
    return derive_seed(setup.config.seed, experience, HEAD_STREAM)


def seeded_linear(seed: int, in_features: int, out_features: int) -> nn.Linear:
    """``nn.Linear`` with its default init drawn under ``seed``, global RNG left untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Linear(in_features, out_features)


# ----------------------------------------------------------------------------------- clsim


def plugin_strategy(args: argparse.Namespace) -> Section:
    """Avalanche's EWCPlugin as a clsim strategy (the adapter), with Avalanche's own lambda."""
    return parse_section("strategy", {"name": "avalanche", "plugin": "EWCPlugin", "ewc_lambda": args.ewc_lambda,
                                      "mode": "separate", "train_mb_size": args.batch_size,
                                      "mask_past": False}, STRATEGIES)


def run_clsim(setup: Setup, order_seed: int, strategy_section: Section | None = None
              ) -> tuple[Seconds, list[list[float | None]]]:
    """The clsim stream (grow, fit, Fisher, evaluate); ``((wall, cpu) seconds, accuracy matrix)``.

    ``order_seed`` is the engine's seed: it only decides the batch order here (no dropout,
    no augmentation); the model, data and class order come from ``setup``.
    ``strategy_section``: another strategy than the config's (the Avalanche plugin adapter).
    """
    base = setup.learner
    model = copy.deepcopy(base.model)
    strategy = (strategy_section or setup.config.strategy).build()
    strategy.setup(model)
    learner = Learner(base.scenario, model, strategy, Engine(setup.config.train, seed=order_seed))
    state = RunState()
    started = clock()
    for exp in base.scenario.experiences:
        grow_seeded(model, base.scenario.seen_classes(exp.index), head_seed(setup, exp.index))
        train_and_evaluate(learner, exp.index, state)
    return since(started), state.rows


@torch.no_grad()
def grow_seeded(model: nn.Module, num_classes: int, seed: int) -> None:
    """``model.grow(num_classes)`` with the new rows drawn under ``seed`` (as Avalanche's head)."""
    old = model.num_classes
    model.grow(num_classes)
    fresh = seeded_linear(seed, model.feature_dim, num_classes)
    model.head.weight[old:] = fresh.weight[old:]
    model.head.bias[old:] = fresh.bias[old:]


# ------------------------------------------------------------------------------- Avalanche


def avalanche_parts():
    """Avalanche's symbols, imported late so that ``--help`` works without it."""
    from avalanche.benchmarks import tensors_benchmark
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.models import IncrementalClassifier
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import EWC
    return tensors_benchmark, accuracy_metrics, IncrementalClassifier, EvaluationPlugin, EWC


def avalanche_model(setup: Setup) -> nn.Module:
    """clsim's initial backbone under Avalanche's IncrementalClassifier, heads seeded like clsim's."""
    _, _, IncrementalClassifier, _, _ = avalanche_parts()

    class SeededIncrementalClassifier(IncrementalClassifier):
        """Avalanche's head; only the random values of newly added rows are fixed by a seed."""

        def adaptation(self, experience):
            with torch.random.fork_rng():
                torch.manual_seed(head_seed(setup, experience.current_experience))
                super().adaptation(experience)

    class Net(nn.Module):
        def __init__(self, backbone: nn.Module, head: nn.Module):
            super().__init__()
            self.backbone, self.head = backbone, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

    first = len(setup.learner.scenario.experiences[0].classes)
    feature_dim = setup.learner.model.feature_dim
    head = SeededIncrementalClassifier(feature_dim, initial_out_features=first)
    head.classifier = seeded_linear(head_seed(setup, 0), feature_dim, first)  # as clsim's first grow
    return Net(copy.deepcopy(setup.learner.model.backbone), head)


class SharedOrder(Sampler):
    """Batches of indices in the order clsim's engine draws them, one epoch per ``iter``."""

    def __init__(self, n: int, batch_size: int, seed: int, experience: int):
        self.n, self.batch_size, self.seed, self.experience, self.epoch = n, batch_size, seed, experience, 0

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.experience, self.epoch))
        self.epoch += 1
        order = torch.randperm(self.n, generator=gen).tolist()
        return iter([order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)])

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def avalanche_strategy(setup: Setup, args: argparse.Namespace, *, shared_order: int | None):
    """Avalanche's EWC strategy with a metrics-only evaluator (no loggers).

    ``shared_order``: None for Avalanche's own shuffling, else the clsim engine seed whose
    batch order the training data loader replays.
    """
    _, accuracy_metrics, _, EvaluationPlugin, EWC = avalanche_parts()
    cfg = setup.config.train

    class SharedOrderEWC(EWC):
        def make_train_dataloader(self, **kwargs):
            data = self.adapted_dataset
            self.dataloader = DataLoader(data, batch_sampler=SharedOrder(
                len(data), cfg.batch_size, shared_order, self.experience.current_experience))

    model = avalanche_model(setup)
    with warnings.catch_warnings():  # "No loggers specified": wanted, nothing is printed
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    return (EWC if shared_order is None else SharedOrderEWC)(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=cfg.lr),
        criterion=nn.CrossEntropyLoss(), ewc_lambda=args.ewc_lambda, mode="separate",
        train_mb_size=cfg.batch_size, train_epochs=cfg.epochs, eval_mb_size=cfg.eval_batch_size,
        device="cpu", evaluator=evaluator, eval_every=-1,
    )


def run_avalanche(setup: Setup, args: argparse.Namespace, order_seed: int, *, shared_order: bool = False
                  ) -> tuple[Seconds, list[list[float | None]]]:
    """The Avalanche stream (train, evaluate seen test sets); ``((wall, cpu) seconds, accuracy matrix)``.

    ``order_seed`` seeds torch before the run (Avalanche's shuffling draws from it), or with
    ``shared_order`` is the clsim engine seed whose batch order is replayed.
    """
    tensors_benchmark = avalanche_parts()[0]
    bench = tensors_benchmark(train_tensors=setup.train, test_tensors=setup.test,
                              task_labels=[0] * len(setup.train))
    torch.manual_seed(order_seed)
    strategy = avalanche_strategy(setup, args, shared_order=order_seed if shared_order else None)
    T, rows = len(setup.train), []
    started = clock()
    for i, exp in enumerate(bench.train_stream):
        strategy.train(exp, reset_optimizer_state=True)  # clsim re-creates its optimizer per task
        results = strategy.eval(bench.test_stream[: i + 1])
        rows.append([results[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"]
                     for j in range(i + 1)] + [None] * (T - i - 1))
    return since(started), rows


# --------------------------------------------------------------------------------- driver


def time_both(setup: Setup, args: argparse.Namespace) -> dict[str, dict[str, list]]:
    """Alternate clsim and Avalanche ``--repeats`` times; repeat r uses data order ``seed + r``."""
    sides = ("clsim", "avalanche", "clsim_avalanche_plugin")
    runs: dict[str, dict[str, list]] = {n: {"seconds": [], "cpu": [], "matrices": []} for n in sides}
    plugin = plugin_strategy(args)
    for r in range(args.repeats):
        order_seed = args.seed + r
        runners: dict[str, Callable[[], tuple[float, list]]] = {
            "clsim": lambda: run_clsim(setup, order_seed),
            "avalanche": lambda: run_avalanche(setup, args, order_seed),
            "clsim_avalanche_plugin": lambda: run_clsim(setup, order_seed, plugin)}
        for name in (sides if r % 2 == 0 else sides[::-1]):
            (seconds, cpu), rows = runners[name]()
            runs[name]["seconds"].append(seconds)
            runs[name]["cpu"].append(cpu)
            runs[name]["matrices"].append(rows)
            log(f"  repeat {r + 1}/{args.repeats} {name:22s} {seconds:7.2f} s wall, {cpu:7.2f} s cpu, "
                f"average accuracy {M.average_accuracy(rows):.4f}")
    return runs


def summary(runs: dict[str, list]) -> dict[str, Any]:
    """Median times; accuracy and forgetting averaged over the runs (their data orders)."""
    matrices = runs["matrices"]
    accs = [M.average_accuracy(rows) for rows in matrices]
    return {
        "wall_s_median": round(statistics.median(runs["seconds"]), 3),
        "wall_s": [round(s, 3) for s in runs["seconds"]],
        "cpu_s": [round(s, 3) for s in runs["cpu"]],
        "average_accuracy": round(statistics.fmean(accs), 4),
        "average_accuracy_std": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
        "average_accuracy_runs": [round(a, 4) for a in accs],
        "forgetting": round(statistics.fmean(M.forgetting(rows) for rows in matrices), 4),
        "accuracy_matrix_first_run": rounded(matrices[0]),
    }


def paired_ratio(runs: dict[str, dict[str, list]], key: str) -> float:
    """Median over repeats of Avalanche's time / clsim's time in the same repeat."""
    return round(statistics.median(a / c for a, c in zip(runs["avalanche"][key], runs["clsim"][key])), 2)


def rounded(rows: list[list[float | None]]) -> list[list[float | None]]:
    """An accuracy matrix with 4 decimals."""
    return [[None if a is None else round(a, 4) for a in row] for row in rows]


def shared_order_check(setup: Setup, args: argparse.Namespace, clsim_rows: list[list]) -> dict[str, Any]:
    """Avalanche on clsim's batch order of the first repeat, against clsim's first matrix."""
    (seconds, _), rows = run_avalanche(setup, args, args.seed, shared_order=True)
    diffs = [abs(a - b) for ra, rb in zip(rows, clsim_rows) for a, b in zip(ra, rb) if a is not None]
    return {
        "wall_s": round(seconds, 3),
        "average_accuracy": round(M.average_accuracy(rows), 4),
        "clsim_average_accuracy": round(M.average_accuracy(clsim_rows), 4),
        "accuracy_diff_points": round(100 * (M.average_accuracy(clsim_rows) - M.average_accuracy(rows)), 2),
        "max_entry_diff_points": round(100 * max(diffs), 2),
        "accuracy_matrix": rounded(rows),
    }


def settings(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Everything both sides share, for the JSON."""
    cfg, scenario = setup.config, setup.learner.scenario
    return {
        "scenario": f"{args.scenario} class-incremental, {len(scenario)} experiences",
        "class_order": list(scenario.class_order), "model": cfg.model.to_dict(),
        "train_images": [len(y) for _, y in setup.train], "test_images": [len(y) for _, y in setup.test],
        "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size, "eval_batch_size": cfg.train.eval_batch_size,
        "optimizer": f"adam lr={cfg.train.lr}, re-created per experience", "ewc_mode": "separate",
        "avalanche_ewc_lambda": args.ewc_lambda, "clsim_lambda": cfg.strategy.kwargs["lambda_"],
        "repeats": args.repeats, "threads": args.threads, "seed": args.seed,
        "torch": torch.__version__, "avalanche": _version("avalanche-lib"),
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
    }


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # Avalanche's own ParamData.expand trips a PyTorch deprecation warning at every step.
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
    avalanche_parts()  # fail early (ImportError) when avalanche-lib is missing
    setup = prepare(args)
    log(f"vs_avalanche: {args.epochs} epochs, {args.repeats} repeats, ewc_lambda {args.ewc_lambda} "
        f"(clsim lambda {2 * args.ewc_lambda})")
    run_clsim(setup, args.seed)  # warm-up (kernels, allocator, lazy imports); not timed
    run_avalanche(setup, args, args.seed)
    run_clsim(setup, args.seed, plugin_strategy(args))
    runs = time_both(setup, args)
    clsim, ava = summary(runs["clsim"]), summary(runs["avalanche"])
    adapter = summary(runs["clsim_avalanche_plugin"])
    diffs = [abs(a - b) for ma, mb in zip(runs["clsim"]["matrices"], runs["clsim_avalanche_plugin"]["matrices"])
             for ra, rb in zip(ma, mb) for a, b in zip(ra, rb) if a is not None]
    adapter |= {"accuracy_diff_points_vs_clsim_ewc": round(100 * (adapter["average_accuracy"] - clsim["average_accuracy"]), 2),
                "max_entry_diff_points_vs_clsim_ewc": round(100 * max(diffs), 2),
                "slowdown_vs_clsim_ewc": round(adapter["wall_s_median"] / clsim["wall_s_median"], 2)}
    result = {
        "benchmark": "vs_avalanche", "settings": settings(setup, args), "clsim": clsim, "avalanche": ava,
        "clsim_avalanche_plugin": adapter,
        "speedup_avalanche_over_clsim": round(ava["wall_s_median"] / clsim["wall_s_median"], 2),
        "speedup_paired_median": paired_ratio(runs, "seconds"),
        "speedup_cpu_time_paired_median": paired_ratio(runs, "cpu"),
        "accuracy_diff_points": round(100 * (clsim["average_accuracy"] - ava["average_accuracy"]), 2),
        "targets": {"speedup": SPEEDUP_TARGET, "accuracy_points": ACCURACY_TARGET_POINTS},
    }
    result["meets_speedup_target"] = result["speedup_avalanche_over_clsim"] >= SPEEDUP_TARGET
    result["meets_accuracy_target"] = abs(result["accuracy_diff_points"]) <= ACCURACY_TARGET_POINTS
    if args.shared_order:
        log("  Avalanche on clsim's batch order (accuracy check)")
        result["shared_order"] = shared_order_check(setup, args, runs["clsim"]["matrices"][0])
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
