"""GPU throughput of the ImageNet-R recipe: clsim's engine against a bare timm loop, and the input pipeline.

    python benchmarks/gpu_throughput.py > gpu_throughput.json     # on a CUDA machine
    python benchmarks/gpu_throughput.py --smoke                   # CPU: tiny ViT, 32 px, a few steps

Question: does ``scenarios/imagenet_r.yaml`` (ViT-B/16 at 224 px, only the QKV projections and
the head trained, Adam, cosine, batch 128, bf16 autocast on CUDA) train and evaluate inside
clsim's engine as fast as in the shortest timm/PyTorch loop doing the same work, and can the
input pipeline (JPEG decode, random-resized crop, flip) keep up with it?

How. The recipe's config is read from the scenario file and built through clsim's registries;
only the data is swapped for generated 224 px images (the ``synthetic`` source, in memory, so no
decoding enters the model comparison): one experience of 20 classes (one ImageNet-R task) of
about ``--batches`` batches, ``--epochs`` passes over them per run. Every timed run starts from a copy of the same initial model (head
grown to 20 classes), and the variants run ``--repeats`` times in rotating order (median):

- ``bare``: the timm ``VisionTransformer`` in a plain loop: the same parameters trainable
  (``train.trainable`` globs, others ``requires_grad=False``), ``Adam(foreach=True)``, the cosine
  schedule, bf16 autocast on CUDA, ``cross_entropy``, ``zero_grad / backward / step``; batches
  indexed from the same CPU tensors with the permutation clsim's engine draws, moved to the
  device as the engine moves them. No per-step ``loss.item()``.
- ``engine``: ``Engine.fit`` with the recipe's train section and ``finetune`` (past-class
  masking on), i.e. the recipe minus its L2 term: what clsim itself adds.
- ``engine_l2``: the recipe's own strategy (L2 on attention, lambda 100), anchored at the
  start weights so the penalty runs from the first step (``first_task_anchor: start``).

Eval: ``Engine.evaluate`` against a bare ``no_grad`` + autocast argmax loop over the same
images (``train.eval_batch_size``). Peak memory: ``torch.cuda.max_memory_allocated`` per run
(null on CPU). ``identical_weights``: bare and engine ended bit-identical (expected on CPU; on
CUDA, bf16 kernels may differ by rounding, see ``max_weight_diff``).

Input pipeline: a generated JPEG folder shaped like ImageNet-R (``imagenet-r/<wnid>/<style>_<i>.jpg``,
sizes drawn in 250-600 px per side; not ImageNet-R's measured size distribution), read through
clsim's own ``imagenet_r`` loader and transforms (decode, random-resized crop to 224, flip,
normalise) and the engine's ``batches`` (a ``DataLoader`` with ``train.num_workers`` workers,
pinned memory on CUDA). ``images_per_s`` counts from the first batch on (``first_batch_s``, the
workers' start, is reported apart: the engine starts them once per epoch).
``ms_per_image_by_stage`` times decode and each transform in one process, and
``workers_to_keep_up`` is how many such processes the engine's training rate would need.

Targets: ``engine_over_bare.train`` and ``.eval`` >= 0.95; the input pipeline not the
bottleneck (``input_pipeline_is_bottleneck``: its images/s below the engine's training
images/s). Figures mean something only on the GPU the recipe is for; ``--smoke`` (CPU) checks
that the script runs and prints every key.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from clsim.config import ExperimentConfig, parse_config, read_yaml  # noqa: E402
from clsim.data.vision import imagenet_r  # noqa: E402
from clsim.engine.engine import Engine, derive_seed  # noqa: E402
from clsim.learner import Learner  # noqa: E402
from clsim.seeds import FIT  # noqa: E402
from clsim.strategies.base import Task  # noqa: E402

RECIPE = ROOT / "scenarios" / "imagenet_r.yaml"
TRAIN_VARIANTS = ("bare", "engine", "engine_l2")
TARGET_RATIO = 0.95
CLASSES = 20  # one ImageNet-R task (10 tasks x 20 classes)
SMOKE_MODEL = {"name": "vit", "embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}


def log(message: str) -> None:
    """Progress lines go to stderr; stdout carries only the JSON result."""
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring); ``--smoke`` shrinks every default."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU smoke run: 2-block ViT (embed 32), 32 px, batch 8, 2 x 2 steps, 16 JPEGs")
    parser.add_argument("--batches", type=int,
                        help="distinct generated batches held in memory (default 10; smoke 2)")
    parser.add_argument("--epochs", type=int, help="passes over them per timed run (default 4; smoke 2)")
    parser.add_argument("--batch-size", type=int, help="default: the recipe's (128; smoke 8)")
    parser.add_argument("--repeats", type=int, help="timed runs of each variant (default 3; smoke 1)")
    parser.add_argument("--pipeline-images", type=int, help="JPEGs generated (default 2000; smoke 16)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: the recipe's 8; smoke 0)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one), cuda or cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    small = {"batches": 2, "epochs": 2, "batch_size": 8, "repeats": 1, "pipeline_images": 16, "workers": 0}
    full = {"batches": 10, "epochs": 4, "batch_size": None, "repeats": 3, "pipeline_images": 2000, "workers": None}
    for key, value in (small if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def recipe_config(args: argparse.Namespace, strategy: dict[str, Any] | None = None) -> ExperimentConfig:
    """``scenarios/imagenet_r.yaml`` with generated in-memory images: one 20-class task of
    about ``--batches`` batches, ``--epochs`` passes."""
    raw = read_yaml(RECIPE)
    train, image_size = raw["train"], 32 if args.smoke else raw["data"]["image_size"]
    train.update(epochs=args.epochs, device=args.device)
    if args.batch_size:
        train["batch_size"] = args.batch_size
    if args.workers is not None:
        train["num_workers"] = args.workers
    # synthetic holds out 20 % of each class: enough per class that `batches` batches train
    per_class = math.ceil(math.ceil(args.batches * train["batch_size"] / CLASSES) / 0.8)
    raw["data"] = {"name": "synthetic", "num_classes": CLASSES, "samples_per_class": per_class,
                   "image_size": image_size, "channels": 3, "seed": args.seed}
    raw["scenario"] = {"name": "class_incremental", "n_tasks": 1, "class_order": "sorted"}
    raw["model"] = dict(SMOKE_MODEL) if args.smoke else {**raw["model"], "pretrained": False}
    if strategy is not None:
        raw["strategy"] = strategy
    return parse_config(raw | {"seed": args.seed, "name": "gpu_throughput"}, base_dir=RECIPE.parent)


@dataclass
class Setup:
    """What every run starts from: the config, the one experience, the initial model (on CPU)."""

    args: argparse.Namespace
    config: ExperimentConfig
    learner: Learner
    initial: torch.nn.Module

    @property
    def data(self) -> Any:
        return self.learner.scenario.experiences[0].train

    @property
    def device(self) -> torch.device:
        return self.learner.engine.device


def prepare(args: argparse.Namespace) -> Setup:
    """The recipe's learner built as ``clsim run`` builds it, its head grown for the task."""
    config = recipe_config(args)
    learner = Learner.build(config)
    learner.model.grow(learner.scenario.seen_classes(0))
    initial = copy.deepcopy(learner.model.cpu())  # on CPU: each run's peak memory is its own
    return Setup(args, config, learner, initial)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(setup: Setup) -> contextlib.AbstractContextManager:
    """The engine's rule: bf16 autocast when ``train.amp`` and on CUDA."""
    if setup.config.train.amp and setup.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def experience_tensors(view: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (N, C, H, W), labels (N,))`` behind a clsim ``View`` of an in-memory source."""
    idx = torch.from_numpy(view.indices)
    labels = torch.from_numpy(view.label_map[view.base.targets[view.indices]])
    return view.base.images[idx], labels


def bare_train(model: torch.nn.Module, setup: Setup) -> None:
    """The plain loop: the recipe's trainable globs, Adam, cosine, autocast; the engine's batches."""
    cfg, seed, device = setup.config.train, setup.config.seed, setup.device
    images, labels = experience_tensors(setup.data)
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(fnmatch.fnmatchcase(name, g) for g in cfg.trainable or ["*"]))
        if p.requires_grad:
            trainable.append(p)
    torch.manual_seed(derive_seed(seed, 0, FIT))  # as Engine.fit (dropout, augmentation)
    optimizer = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    steps = math.ceil(len(labels) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps * cfg.epochs)
    model.train()
    for epoch in range(cfg.epochs):
        seed_epoch = derive_seed(seed, 0, epoch)  # the engine's permutation of this epoch
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed_epoch))
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x, y = images[idx].to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)
            with autocast(setup):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


def engine_train(model: torch.nn.Module, setup: Setup, variant: str) -> Any:
    """``Engine.fit`` on the experience with ``finetune`` (engine) or the recipe's L2 (engine_l2),
    as a call: the config is parsed and the strategy set up before the clock starts."""
    strategy = ({"name": "finetune", "mask_past": True} if variant == "engine" else
                {**setup.config.strategy.to_dict(), "first_task_anchor": "start"})
    config = recipe_config(setup.args, strategy)
    strategy = config.strategy.build()
    strategy.setup(model)
    exp = setup.learner.scenario.experiences[0]
    engine = Engine(config.train, seed=config.seed)

    def fit() -> None:
        data = strategy.before_task(model, Task(exp, (), model.num_classes))  # L2 takes its anchor here
        engine.fit(model, strategy, data, experience=0, label="train")
    return fit


@dataclass
class Run:
    wall_s: float
    peak_mib: float | None
    model: torch.nn.Module | None


def timed(setup: Setup, fn: Any) -> tuple[float, float | None]:
    """Wall time of ``fn()`` (device synchronised) and the device's peak memory during it."""
    device = setup.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return wall, peak


def train_run(setup: Setup, variant: str) -> Run:
    """One timed training run (``--epochs`` passes) of ``variant`` from a fresh copy of the initial model."""
    model = copy.deepcopy(setup.initial).to(setup.device)
    if variant == "bare":
        wall, peak = timed(setup, lambda: bare_train(model, setup))
    else:
        wall, peak = timed(setup, engine_train(model, setup, variant))
    return Run(wall, peak, model.cpu())


def eval_run(setup: Setup, model: torch.nn.Module, variant: str) -> tuple[Run, float]:
    """One timed pass over the experience's images: ``Engine.evaluate`` or a bare argmax loop."""
    model = model.to(setup.device)
    result: dict[str, float] = {}

    def bare() -> None:
        images, labels = experience_tensors(setup.data)
        model.eval()
        hits = 0
        with torch.no_grad():
            for start in range(0, len(labels), setup.config.train.eval_batch_size):
                x = images[start : start + setup.config.train.eval_batch_size].to(setup.device, non_blocking=True)
                y = labels[start : start + setup.config.train.eval_batch_size].to(setup.device, non_blocking=True)
                with autocast(setup):
                    hits += int((model(x).argmax(dim=1) == y).sum())
        result["accuracy"] = hits / len(labels)

    strategy = recipe_config(setup.args, {"name": "finetune", "mask_past": True}).strategy.build()

    def engine() -> None:
        out = setup.learner.engine.evaluate(model, strategy, setup.data, num_classes=model.num_classes)
        result["accuracy"] = out.accuracy

    wall, peak = timed(setup, bare if variant == "bare" else engine)
    return Run(wall, peak, None), result["accuracy"]


def rotate(variants: tuple[str, ...], r: int) -> list[str]:
    """The order of repeat ``r``: rotated and, every other repeat, reversed (drift cancels)."""
    order = list(variants[r % len(variants):] + variants[: r % len(variants)])
    return order[::-1] if r % 2 else order


def compare_train(setup: Setup, repeats: int) -> tuple[dict[str, Any], torch.nn.Module]:
    """Training: median images/s, ms/step and peak memory per variant, bare vs engine weights;
    and the model the last engine run trained (what evaluation times)."""
    epochs = setup.config.train.epochs
    images = len(setup.data) * epochs
    steps = math.ceil(len(setup.data) / setup.config.train.batch_size) * epochs
    for variant in TRAIN_VARIANTS:  # warm-up: kernels, allocator, cuDNN/cuBLAS heuristics
        train_run(setup, variant)
    runs: dict[str, list[Run]] = {v: [] for v in TRAIN_VARIANTS}
    for r in range(repeats):
        for variant in rotate(TRAIN_VARIANTS, r):
            runs[variant].append(train_run(setup, variant))
            log(f"  train repeat {r + 1}/{repeats} {variant:9s} {runs[variant][-1].wall_s:8.3f} s "
                f"({images / runs[variant][-1].wall_s:8.1f} img/s)")
    bare, engine = runs["bare"][-1].model.state_dict(), runs["engine"][-1].model.state_dict()
    diff = max(float((bare[k].float() - engine[k].float()).abs().max()) for k in bare)
    wall = {v: [r.wall_s for r in rs] for v, rs in runs.items()}
    return {
        "images_per_run": images, "steps_per_run": steps,
        "images_per_s": {v: round(images / statistics.median(s), 1) for v, s in wall.items()},
        "ms_per_step": {v: round(1000 * statistics.median(s) / steps, 2) for v, s in wall.items()},
        "peak_memory_mib": {v: _peak(rs) for v, rs in runs.items()},
        "wall_s": {v: [round(x, 4) for x in s] for v, s in wall.items()},
        "identical_weights": diff == 0.0, "max_weight_diff": diff,
    }, runs["engine"][-1].model


def compare_eval(setup: Setup, model: torch.nn.Module, repeats: int) -> dict[str, Any]:
    """Evaluation: median images/s and peak memory, bare against ``Engine.evaluate``."""
    images = len(setup.data)
    for variant in ("bare", "engine"):
        eval_run(setup, model, variant)
    runs: dict[str, list[Run]] = {"bare": [], "engine": []}
    accuracy: dict[str, float] = {}
    for r in range(repeats):
        for variant in rotate(("bare", "engine"), r):
            run, accuracy[variant] = eval_run(setup, model, variant)
            runs[variant].append(run)
            log(f"  eval  repeat {r + 1}/{repeats} {variant:9s} {run.wall_s:8.3f} s ({images / run.wall_s:8.1f} img/s)")
    return {
        "images_per_run": images,
        "images_per_s": {v: round(images / statistics.median(r.wall_s for r in rs), 1) for v, rs in runs.items()},
        "peak_memory_mib": {v: _peak(rs) for v, rs in runs.items()},
        "accuracy": accuracy,
    }


def _peak(runs: list[Run]) -> float | None:
    peaks = [r.peak_mib for r in runs if r.peak_mib is not None]
    return round(max(peaks), 1) if peaks else None


# --------------------------------------------------------------------------- input pipeline


WNIDS = [f"n{1440764 + 7 * i:08d}" for i in range(CLASSES)]  # wnid-shaped names
STYLES = ("art", "cartoon", "sketch", "painting", "toy", "origami")


def write_jpeg_folder(root: Path, n: int, seed: int) -> None:
    """``root/imagenet-r/<wnid>/<style>_<i>.jpg``: ``n`` JPEGs of 250-600 px per side (quality 90)
    with smooth colour fields plus noise, so they decode like photographs, not like flat files."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    classes = max(2, min(CLASSES, n // 8))  # ImageNet-R: 20 classes per task, ~150 images each
    for i in range(n):
        w, h = (int(v) for v in rng.integers(250, 601, size=2))
        coarse = rng.integers(0, 256, size=(h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.int16)
        pixels = np.clip(field + rng.normal(0, 12, size=field.shape), 0, 255).astype(np.uint8)
        path = root / "imagenet-r" / WNIDS[i % classes] / f"{STYLES[i % len(STYLES)]}_{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)


def measure_pipeline(setup: Setup, args: argparse.Namespace, train_images_per_s: float) -> dict[str, Any]:
    """Images/s of clsim's ImageNet-R loader + transforms through the engine's ``batches``, and
    the one-process cost of each stage (which part a fix would have to speed up)."""
    cfg = setup.config.train
    size = 32 if args.smoke else 224
    with tempfile.TemporaryDirectory(prefix="clsim_gpu_throughput_") as tmp:
        write_jpeg_folder(Path(tmp), args.pipeline_images, args.seed)
        source = imagenet_r(root=tmp, image_size=size, test_fraction=0.2, split_seed=args.seed,
                            augment=True, normalize="inception")
        data = source.train
        breakdown = stage_costs(data, min(len(data), 64))
        engine = setup.learner.engine
        started, first, count = time.perf_counter(), None, 0
        for x, _ in engine.batches(data, batch_size=cfg.batch_size, shuffle=True, seed=args.seed):
            if first is None:
                sync(engine.device)
                first, first_n = time.perf_counter(), len(x)
            count += len(x)
        sync(engine.device)
        end = time.perf_counter()
    steady = (count - first_n) / (end - first) if count > first_n and end > first else None
    return {
        "images": len(data), "image_size": size, "workers": cfg.num_workers, "batch_size": cfg.batch_size,
        "first_batch_s": round(first - started, 3),
        "images_per_s": round(steady, 1) if steady else None,
        "images_per_s_with_start": round(count / (end - started), 1),
        "ms_per_image_one_process": round(sum(breakdown.values()), 3),
        "ms_per_image_by_stage": breakdown,
        # workers that would feed the engine's measured training rate at the one-process cost
        "workers_to_keep_up": math.ceil(train_images_per_s * sum(breakdown.values()) / 1000),
    }


def stage_costs(data: Any, n: int) -> dict[str, float]:
    """Milliseconds per image of each stage of the data set's own pipeline, in one process:
    the loader's decode (``default_loader``: PIL open + RGB), then each of its transforms."""
    from torchvision.datasets.folder import default_loader

    stages = list(getattr(data.transform, "transforms", [data.transform]))
    totals = {"decode": 0.0, **{type(t).__name__: 0.0 for t in stages}}
    for path, _ in data.samples[:n]:
        start = time.perf_counter()
        x = default_loader(path)
        totals["decode"] += time.perf_counter() - start
        for t in stages:
            start = time.perf_counter()
            x = t(x)
            totals[type(t).__name__] += time.perf_counter() - start
    return {k: round(1000 * v / n, 3) for k, v in totals.items()}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = prepare(args)
    cfg = setup.config.train
    log(f"gpu_throughput: {setup.device}, model {setup.config.model.to_dict()}, batch {cfg.batch_size}, "
        f"{len(setup.data)} images x {cfg.epochs} epochs per run, amp {cfg.amp and setup.device.type == 'cuda'}")
    train, trained = compare_train(setup, args.repeats)
    evaluation = compare_eval(setup, trained, args.repeats)
    log("input pipeline: writing and reading the JPEG folder")
    pipeline = measure_pipeline(setup, args, train["images_per_s"]["engine"])
    ratio = {"train": round(train["images_per_s"]["engine"] / train["images_per_s"]["bare"], 4),
             "eval": round(evaluation["images_per_s"]["engine"] / evaluation["images_per_s"]["bare"], 4)}
    bottleneck = pipeline["images_per_s"] is not None and pipeline["images_per_s"] < train["images_per_s"]["engine"]
    result = {
        "benchmark": "gpu_throughput",
        "device": str(setup.device),
        "device_name": torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else platform.processor() or "cpu",
        "smoke": args.smoke,
        "settings": {"recipe": str(RECIPE.relative_to(ROOT)), "model": setup.config.model.to_dict(),
                     "trainable": cfg.trainable, "batch_size": cfg.batch_size, "batches": args.batches,
                     "epochs": args.epochs,
                     "repeats": args.repeats, "bf16_autocast": bool(cfg.amp and setup.device.type == "cuda"),
                     "threads": args.threads, "seed": args.seed, "torch": torch.__version__,
                     "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "train": train,
        "eval": evaluation,
        "engine_over_bare": ratio,
        "target_engine_over_bare": TARGET_RATIO,
        "meets_target": {k: v >= TARGET_RATIO for k, v in ratio.items()},
        "input_pipeline": pipeline,
        "input_pipeline_is_bottleneck": bottleneck,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
