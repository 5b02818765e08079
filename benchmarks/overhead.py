"""clsim's training throughput against a bare PyTorch loop doing exactly the same work.

    python benchmarks/overhead.py                      # both cases, defaults (~2-3 min, 2 cores)
    python benchmarks/overhead.py --epochs 1 --repeats 1 --cases digits_vit   # smoke

For each case (a clsim experiment: data, class-incremental scenario, model), both sides train
the same stream of experiences from the same initial weights (the model is built once through
clsim's config and registries and deep-copied), with the same batches in the same order (the
bare loop indexes the same in-memory tensors with the permutation clsim's engine draws), the
same augmentation draws, the same Adam optimizer re-created per experience, and the same
number of steps. Only training is timed (``Engine.fit`` against the bare loop, summed over the
experiences); evaluation and EWC's Fisher pass are excluded. The bare and clsim fine-tuning
runs end with bit-identical weights, which the JSON reports as ``identical_weights``.

Variants, run in a rotating order in every repeat so that machine drift cancels out:

- ``bare``: ``model(x)``, cross-entropy, ``zero_grad``, ``backward``, ``step``; nothing else.
- ``clsim``: ``Engine.fit`` with the fine-tuning strategy and silent progress (``--quiet``).
- ``clsim_progress``: the same with progress bars rendered as on a terminal (into /dev/null).
- ``clsim_ewc``: ``Engine.fit`` with EWC (its penalty active from the second experience).

Prints one JSON object on stdout; progress goes to stderr. The overhead of a variant is
``(bare_throughput / variant_throughput - 1) * 100``, given three ways: ``overhead_pct`` on
the median wall-clock throughputs, ``overhead_pct_paired`` as the median over repeats of the
same-repeat wall-time ratio (cancels drift between repeats), and ``overhead_pct_cpu_time``,
the paired ratio of this process's CPU time, which other jobs on a shared machine disturb
least. Target: ``overhead_pct_cpu_time.clsim`` < 5 % in every case (``meets_target``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from clsim.config import ExperimentConfig, parse_config  # noqa: E402
from clsim.engine.engine import Engine, derive_seed  # noqa: E402
from clsim.engine.progress import Progress  # noqa: E402
from clsim.learner import Learner  # noqa: E402
from clsim.scenarios.base import Scenario  # noqa: E402
from clsim.seeds import FIT  # noqa: E402
from clsim.strategies.base import Task  # noqa: E402

VARIANTS = ("bare", "clsim", "clsim_progress", "clsim_ewc")
TARGET_PCT = 5.0
TARGET_METRIC = "overhead_pct_cpu_time"  # clsim's own cost, least disturbed by other jobs
HEAD_STREAM = 2_000_003  # derive_seed tag of the head-growth draws (distinct from the engine's)

# Each case is a clsim experiment (the YAML sections as a mapping) and its default epochs.
CASES: dict[str, tuple[dict[str, Any], int]] = {
    # scenarios/quickstart.yaml: digits 8x8 (1 channel), 5 tasks, a 2-block ViT, batch 16.
    # Tiny steps (~5-10 ms): the case where a per-step overhead shows most.
    "digits_vit": ({
        "data": {"name": "digits"},
        "scenario": {"name": "class_incremental", "n_tasks": 5},
        "model": {"name": "vit", "embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0},
        "train": {"batch_size": 16, "lr": 0.001, "optimizer": "adam"},
    }, 3),
    # 32x32 RGB, a 4-block ViT on 64 patches, batch 32: per-step compute dominates.
    "synthetic32_vit": ({
        "data": {"name": "synthetic", "num_classes": 10, "samples_per_class": 50,
                 "image_size": 32, "channels": 3},
        "scenario": {"name": "class_incremental", "n_tasks": 5},
        "model": {"name": "vit", "patch_size": 4, "embed_dim": 128, "depth": 4, "num_heads": 4},
        "train": {"batch_size": 32, "lr": 0.001, "optimizer": "adam"},
    }, 1),
}


def log(message: str) -> None:
    """Progress lines go to stderr; stdout carries only the JSON result."""
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES),
                        help="which cases to run (default: all)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per experience (default: per case, 3 for digits, 1 for synthetic32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each variant (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: stable on a shared 2-core machine)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="what to time ('bare' and 'clsim' are always included)")
    parser.add_argument("--seed", type=int, default=0, help="experiment seed")
    args = parser.parse_args(argv)
    args.variants = ["bare", "clsim"] + [v for v in args.variants if v not in ("bare", "clsim")]
    return args


def case_config(name: str, *, strategy: dict[str, Any], epochs: int | None, seed: int) -> ExperimentConfig:
    """The validated clsim config of case ``name`` with ``strategy``."""
    sections, default_epochs = CASES[name]
    raw = copy.deepcopy(sections)
    raw["train"]["epochs"] = epochs or default_epochs
    return parse_config({"name": name, "seed": seed, "strategy": strategy, **raw})


@dataclass
class Setup:
    """What every variant of one case starts from."""

    config: ExperimentConfig
    scenario: Scenario
    initial: torch.nn.Module  # never trained; each run deep-copies it

    @property
    def images_per_run(self) -> int:
        return self.config.train.epochs * sum(len(e.train) for e in self.scenario.experiences)

    @property
    def steps_per_run(self) -> int:
        bs = self.config.train.batch_size
        return self.config.train.epochs * sum(math.ceil(len(e.train) / bs) for e in self.scenario.experiences)


def prepare(name: str, args: argparse.Namespace) -> Setup:
    """Build the case's scenario and initial model exactly as ``clsim run`` does."""
    config = case_config(name, strategy={"name": "finetune"}, epochs=args.epochs, seed=args.seed)
    learner = Learner.build(config, Progress(quiet=True))
    return Setup(config, learner.scenario, copy.deepcopy(learner.model))


def experience_tensors(dataset: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """``(images (N, C, H, W), labels (N,), batch transform)`` behind a clsim ``View``."""
    base, idx = dataset.base, torch.from_numpy(dataset.indices)
    labels = torch.from_numpy(dataset.label_map[base.targets[dataset.indices]])
    return base.images[idx], labels, base.transform


def bare_fit(model: torch.nn.Module, data: Any, setup: Setup, experience: int) -> None:
    """The plain PyTorch loop: the same seeds, permutation, transform and optimizer as clsim."""
    images, labels, transform = experience_tensors(data)
    cfg, seed = setup.config.train, setup.config.seed
    torch.manual_seed(derive_seed(seed, experience, FIT))  # as Engine.fit (augmentation draws)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(
            derive_seed(seed, experience, epoch)))
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x = images[idx] if transform is None else transform(images[idx])
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


@contextlib.contextmanager
def progress_for(variant: str) -> Iterator[Progress]:
    """Silent progress, or bars rendered as on a terminal (into /dev/null) for ``clsim_progress``."""
    if variant != "clsim_progress":
        yield Progress(quiet=True)
        return
    with open(os.devnull, "w") as sink, mock.patch.dict(os.environ, {"TTY_COMPATIBLE": "1"}):
        progress = Progress(quiet=False)
        progress.console.file = sink
        with progress:
            yield progress


@dataclass
class Run:
    """One timed pass over the stream."""

    wall_s: float  # training only, summed over the experiences
    cpu_s: float  # this process's CPU time over the same spans (all its threads)
    fisher_s: float  # EWC's Fisher pass (after_task), not part of wall_s
    model: torch.nn.Module


def run_variant(setup: Setup, variant: str, *, experiences: int | None = None) -> Run:
    """Train the stream (or its first ``experiences``) once as ``variant``."""
    model = copy.deepcopy(setup.initial)
    strategy_cfg = {"name": "ewc", "lambda": 10000.0} if variant == "clsim_ewc" else {"name": "finetune"}
    config = case_config(setup.config.name, strategy=strategy_cfg,
                         epochs=setup.config.train.epochs, seed=setup.config.seed)
    strategy = config.strategy.build()
    strategy.setup(model)
    run = Run(0.0, 0.0, 0.0, model)
    with progress_for(variant) as progress:
        engine = Engine(config.train, seed=config.seed, progress=progress)
        for exp in setup.scenario.experiences[:experiences]:
            # new head rows drawn under a fixed seed (else they depend on what ran before); untimed
            torch.manual_seed(derive_seed(config.seed, exp.index, HEAD_STREAM))
            model.grow(setup.scenario.seen_classes(exp.index))
            task = Task(exp, tuple(setup.scenario.experiences[: exp.index]), model.num_classes)
            wall, cpu = time.perf_counter(), time.process_time()
            if variant == "bare":
                bare_fit(model, exp.train, setup, exp.index)
            else:
                data = strategy.before_task(model, task)
                engine.fit(model, strategy, data, experience=exp.index, label=f"train {exp.index + 1}")
            run.wall_s += time.perf_counter() - wall
            run.cpu_s += time.process_time() - cpu
            wall = time.perf_counter()
            strategy.after_task(model, task, lambda: engine.batches(exp.train, batch_size=config.train.batch_size))
            run.fisher_s += time.perf_counter() - wall
    return run


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two models hold bit-identical parameters and buffers."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def time_case(setup: Setup, variants: list[str], repeats: int) -> tuple[dict[str, list[Run]], bool]:
    """Every variant ``repeats`` times in rotating order; the runs, and whether bare == clsim."""
    runs: dict[str, list[Run]] = {v: [] for v in variants}
    identical = True
    for r in range(repeats):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        if r % 2:
            order.reverse()
        for variant in order:
            run = run_variant(setup, variant)
            runs[variant].append(run)
            log(f"  repeat {r + 1}/{repeats} {variant:15s} {run.wall_s:7.3f} s wall, {run.cpu_s:7.3f} s cpu "
                f"({setup.images_per_run / run.wall_s:8.1f} img/s)")
        identical &= same_weights(runs["bare"][-1].model, runs["clsim"][-1].model)
        for variant in variants:
            runs[variant][-1].model = None  # keep memory flat
    return runs, identical


def overheads(images: int, seconds: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Median throughputs, and each variant's overhead over ``bare`` in percent (ratio of medians)."""
    throughput = {v: images / statistics.median(s) for v, s in seconds.items()}
    return throughput, {v: round((throughput["bare"] / t - 1) * 100, 2)
                        for v, t in throughput.items() if v != "bare"}


def paired_overheads(seconds: dict[str, list[float]]) -> dict[str, float]:
    """Overhead in percent as the median over repeats of ``variant / bare`` in the same repeat.

    Runs of one repeat are adjacent in time, so this cancels drift between repeats (other
    jobs starting or stopping) that a ratio of medians keeps.
    """
    bare = seconds["bare"]
    return {v: round((statistics.median(x / b for x, b in zip(s, bare)) - 1) * 100, 2)
            for v, s in seconds.items() if v != "bare"}


def summarize_case(setup: Setup, runs: dict[str, list[Run]], identical: bool) -> dict[str, Any]:
    """Median throughputs and overhead percentages (wall and CPU time) for one case."""
    wall = {v: [r.wall_s for r in rs] for v, rs in runs.items()}
    cpu = {v: [r.cpu_s for r in rs] for v, rs in runs.items()}
    throughput, overhead = overheads(setup.images_per_run, wall)
    cfg, fisher = setup.config, [r.fisher_s for r in runs.get("clsim_ewc", [])]
    return {
        "model": cfg.model.to_dict(), "data": cfg.data.to_dict(), "input_shape": list(setup.scenario.input_shape),
        "experiences": len(setup.scenario), "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size,
        "images_per_run": setup.images_per_run, "steps_per_run": setup.steps_per_run,
        "ms_per_step": {v: round(1000 * statistics.median(s) / setup.steps_per_run, 3) for v, s in wall.items()},
        "images_per_s": {v: round(t, 1) for v, t in throughput.items()},
        "overhead_pct": overhead,
        "overhead_pct_paired": paired_overheads(wall),
        "overhead_pct_cpu_time": paired_overheads(cpu),
        "train_wall_s": {v: [round(x, 4) for x in s] for v, s in wall.items()},
        "train_cpu_s": {v: [round(x, 4) for x in s] for v, s in cpu.items()},
        "identical_weights": identical,
        "ewc_fisher_s": round(statistics.median(fisher), 4) if fisher else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = {}
    for name in args.cases:
        setup = prepare(name, args)
        log(f"{name}: {setup.images_per_run} images, {setup.steps_per_run} steps per run, "
            f"{args.repeats} repeats of {', '.join(args.variants)}")
        for variant in args.variants:  # warm-up: allocator, kernels, lazy imports, first render
            run_variant(setup, variant, experiences=2)
        runs, identical = time_case(setup, args.variants, args.repeats)
        cases[name] = summarize_case(setup, runs, identical)
    worst = max(c[TARGET_METRIC]["clsim"] for c in cases.values())
    result = {
        "benchmark": "overhead",
        "settings": {"repeats": args.repeats, "threads": args.threads, "seed": args.seed,
                     "variants": args.variants, "torch": torch.__version__,
                     "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "target_overhead_pct": TARGET_PCT,
        "target_metric": TARGET_METRIC,
        "max_overhead_pct": worst,
        "meets_target": worst < TARGET_PCT,
        "cases": cases,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
