"""DHVT against a plain ViT and a CNN, all trained from scratch on a small data set at one budget.

    python benchmarks/dhvt.py            # 5 seeds, scikit-learn digits upsampled to 16 px
    python benchmarks/dhvt.py --quick    # 1 seed, 2 epochs, few images (the smoke test)

Lu et al., "Bridging the Gap Between Vision Transformers and Convolutional Neural Networks on
Small Datasets" (NeurIPS 2022). The paper's direction: trained from scratch on a small data
set, a plain ViT falls well below a CNN of similar size, and DHVT (SOPE patch embedding, DAFF,
head tokens; ``model: dhvt``) closes that gap (matches or beats the CNN).

Rows, each a ``clsim run`` of plain CE fine-tuning (``finetune``) on one experience holding
every class, with the same data, seeds, epochs, optimiser (AdamW, cosine), batch size and
augmentation (the digits source's random 1-pixel shift; no other):

- ``vit``: timm's ViT (``model: vit``), learned position embedding, CLS token.
- ``dhvt``: clsim's DHVT with the same width, depth, heads and patch size.
- ``resnet``: clsim's CIFAR ResNet (``resnet_cifar``, He et al. Sec. 4.2; not timm's
  ImageNet ResNet-18, whose 11 M parameters would be 50x the others), sized near the
  transformers' parameter count.

Parameter counts (with the 10-class head) are in the JSON and the report. Every run starts from
scratch in a fresh ``--out``. Prints one JSON object on stdout; writes ``--report`` and ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from clsim.config import parse_config  # noqa: E402
from clsim.experiment import run  # noqa: E402
from evidence import fresh_out, mean_std  # noqa: E402  (benchmarks/evidence.py)

TRANSFORMER = {"embed_dim": 64, "depth": 4, "num_heads": 4, "patch_size": 4}
MODELS = {
    "vit": {"name": "vit", **TRANSFORMER, "mlp_ratio": 4.0},
    "dhvt": {"name": "dhvt", **TRANSFORMER, "mlp_ratio": 4.0},
    "resnet": {"name": "resnet_cifar", "depth": 20, "width": 16},
}
BASE = {
    "data": {"name": "digits", "image_size": 16},
    "scenario": {"name": "class_incremental", "n_tasks": 1, "class_order": "sorted", "max_train_per_class": 50},
    "strategy": {"name": "finetune"},
    "train": {"epochs": 40, "batch_size": 32, "lr": 0.001, "optimizer": "adamw", "weight_decay": 0.05,
              "schedule": "cosine"},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default=None, help="an empty or new folder for the run folders (default: a temp dir)")
    parser.add_argument("--report", default=str(ROOT / "reports" / "dhvt.md"), help="'' to skip")
    parser.add_argument("--json", default=str(ROOT / "reports" / "dhvt.json"), help="'' to skip")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, few images: a smoke run")
    return parser.parse_args()


def row_config(row: str, seed: int, quick: bool) -> dict[str, Any]:
    cfg = copy.deepcopy(BASE) | {"name": f"{row}_s{seed}", "seed": seed, "model": dict(MODELS[row])}
    if quick:
        cfg["scenario"] |= {"max_train_per_class": 8, "max_test_per_class": 4}
        cfg["train"] |= {"epochs": 2}
    return cfg


def parameter_count(cfg: dict[str, Any]) -> int:
    config = parse_config(cfg)
    scenario = config.scenario.build(config.data.build(), config.seed)
    model = config.model.build(scenario.input_shape)
    model.grow(scenario.num_classes)
    return sum(p.numel() for p in model.parameters())


def run_row(cfg: dict[str, Any], run_dir: Path) -> dict:
    started = time.perf_counter()
    metrics = run(parse_config(cfg), run_dir, quiet=True)
    print(f"{cfg['name']}: {metrics['average_accuracy']:.3f} ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr)
    return metrics


def write_report(path: Path, result: dict[str, Any], command: str) -> None:
    rows, params = result["rows"], result["parameters"]
    gap_vit = 100 * (rows["resnet"]["mean"] - rows["vit"]["mean"])
    gap_dhvt = 100 * (rows["resnet"]["mean"] - rows["dhvt"]["mean"])
    lines = [
        "# DHVT from scratch on a small data set: does it close the ViT-CNN gap?",
        "",
        f"Generated from scratch by `{command}` (seeds {result['seeds']}, {result['wall_s'] / 60:.0f} min wall, "
        f"{result['cpu_s'] / 60:.0f} min CPU, {result['threads']} thread). Test accuracy in %, mean ± std over "
        f"seeds; the same data, seeds, epochs, optimiser and augmentation for every row "
        f"(docstring of `benchmarks/dhvt.py`).",
        "",
        f"Data: scikit-learn digits upsampled to {BASE['data']['image_size']} px, "
        f"{result['train_images']} training images ({result['max_train_per_class']} a class at most), "
        f"{result['test_images']} test images. Training: `{result['train']}`.",
        "",
        "| row | model | parameters | accuracy |",
        "|---|---|---|---|",
    ]
    for row in MODELS:
        lines.append(f"| {row} | `{MODELS[row]}` | {params[row]:,} | "
                     f"{100 * rows[row]['mean']:.1f} ± {100 * rows[row]['std']:.1f} |")
    lines += ["", f"CNN minus ViT: {gap_vit:+.1f} points; CNN minus DHVT: {gap_dhvt:+.1f} points. "
              f"The paper's direction (the ViT below the CNN, DHVT closing the gap): "
              f"**{'yes' if result['checks']['dhvt_closes_gap'] else 'no'}** "
              f"(ViT below CNN: {'yes' if result['checks']['vit_below_cnn'] else 'no'}; "
              f"DHVT above ViT: {'yes' if result['checks']['dhvt_above_vit'] else 'no'})."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds = args.seeds[:1]
    out = fresh_out(args.out, "bench_dhvt_")
    started, cpu_started = time.perf_counter(), time.process_time()
    per_seed = {row: [] for row in MODELS}
    for seed in args.seeds:
        for row in MODELS:
            per_seed[row].append(run_row(row_config(row, seed, args.quick), out / f"seed{seed}" / row))
    rows = {row: mean_std([m["average_accuracy"] for m in runs]) for row, runs in per_seed.items()}
    cfg = row_config("vit", args.seeds[0], args.quick)
    config = parse_config(cfg)
    scenario = config.scenario.build(config.data.build(), config.seed)
    m = {row: rows[row]["mean"] for row in rows}
    result = {
        "benchmark": "dhvt", "seeds": args.seeds, "quick": args.quick, "threads": args.threads,
        "train_images": len(scenario.experiences[0].train), "test_images": len(scenario.experiences[0].test),
        "max_train_per_class": cfg["scenario"]["max_train_per_class"], "train": cfg["train"], "models": MODELS,
        "parameters": {row: parameter_count(row_config(row, args.seeds[0], args.quick)) for row in MODELS},
        "rows": rows, "per_seed": {row: [r["average_accuracy"] for r in runs] for row, runs in per_seed.items()},
        "checks": {"vit_below_cnn": m["vit"] < m["resnet"], "dhvt_above_vit": m["dhvt"] > m["vit"],
                   # closing the gap: DHVT recovers at least half of the ViT's shortfall
                   "dhvt_closes_gap": m["vit"] < m["resnet"] and m["resnet"] - m["dhvt"] <= (m["resnet"] - m["vit"]) / 2},
        "wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(time.process_time() - cpu_started, 1),
    }
    command = "python benchmarks/dhvt.py" + (" --quick" if args.quick else "")
    if args.report:
        write_report(Path(args.report), result, command)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
