"""DeiT-LT against plain ViT training on one long-tailed stream: overall / head / medium / tail.

    python benchmarks/deit_lt.py                  # 3 seeds, scenarios/synthetic_lt.yaml (~25 min, 2 cores)
    python benchmarks/deit_lt.py --quick          # 1 seed, 1 epoch each, tiny data (a smoke run)

Rows, each trained with the same data, student architecture, augmentation recipe, optimiser
and seeds (everything comes from ``--config``; only the strategy and teacher change):

- ``vit_ce``: the DeiT student without a teacher: both heads learn the mixed labels (CE).
- ``vit_drw``: the same with DRW (class-balanced re-weighting) of the second head's loss.
- ``teacher``: the CNN teacher alone (ResNet trained with SAM and logit adjustment).
- ``deit_lt_clean``: hard distillation, the teacher seeing the batch before strong augmentation,
  no DRW (an extra ablation; the paper's in-distribution one trains the teacher on the strong
  augmentations: ``teacher: {strategy: {name: deit_lt_teacher}}``, not a row here yet).
- ``deit_lt``: full DeiT-LT: hard distillation on the strongly augmented (OOD) batch + DRW.

One teacher is trained per seed (a clsim run that keeps its model) and loaded by both
distilled rows through ``teacher.checkpoint``. Prints one JSON object on stdout and writes
``reports/deit_lt.md`` (``--report``); run folders go to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from clsim.config import parse_config  # noqa: E402
from clsim.experiment import run  # noqa: E402
from clsim.teacher import teacher_config  # noqa: E402

ROWS = {  # strategy keys over the config's deit_lt section
    "vit_ce": {"distillation": "none", "drw": False},
    "vit_drw": {"distillation": "none", "drw": True},
    "deit_lt_clean": {"distillation": "hard", "teacher_input": "clean", "drw": False},
    "deit_lt": {"distillation": "hard", "teacher_input": "augmented", "drw": True},
}
ORDER = ("vit_ce", "vit_drw", "teacher", "deit_lt_clean", "deit_lt")
KEYS = ("average_accuracy", "head_accuracy", "medium_accuracy", "tail_accuracy")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "scenarios" / "synthetic_lt.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench_deit_lt", help="folder for the run folders")
    parser.add_argument("--report", default=str(ROOT / "reports" / "deit_lt.md"), help="'' to skip")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, few images: a smoke run")
    return parser.parse_args()


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    raw = yaml.safe_load(Path(args.config).read_text())
    if args.quick:
        raw["data"] |= {"samples_per_class": 40}
        raw["train"] |= {"epochs": 2}
        raw["teacher"]["train"] |= {"epochs": 1}
    return raw


def run_seed(raw: dict[str, Any], seed: int, out: Path) -> dict[str, dict]:
    """The five rows' metrics for one seed."""
    raw = copy.deepcopy(raw) | {"seed": seed}
    teacher_dir = out / f"seed{seed}" / "teacher"
    results = {"teacher": train_teacher(raw, teacher_dir)}
    for row, keys in ROWS.items():
        cfg = copy.deepcopy(raw) | {"name": f"{row}_s{seed}"}
        cfg["strategy"] = {**cfg["strategy"], **keys}
        if keys["distillation"] == "none":
            cfg.pop("teacher")
        else:
            cfg["teacher"] = {"checkpoint": str(teacher_dir)}
        results[row] = run_row(cfg, out / f"seed{seed}" / row)
    return results


def train_teacher(raw: dict[str, Any], run_dir: Path) -> dict:
    if (run_dir / "metrics.json").exists():
        return json.loads((run_dir / "metrics.json").read_text())
    started = time.perf_counter()
    metrics = run(teacher_config(parse_config(raw)), run_dir, quiet=True, keep_models=True)
    print(f"teacher seed {raw['seed']}: {metrics['average_accuracy']:.3f} "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return metrics


def run_row(cfg: dict[str, Any], run_dir: Path) -> dict:
    if (run_dir / "metrics.json").exists():  # a re-run finishes only what is missing
        return json.loads((run_dir / "metrics.json").read_text())
    started = time.perf_counter()
    metrics = run(parse_config(cfg), run_dir, quiet=True, resume=run_dir.exists())
    print(f"{cfg['name']}: {metrics['average_accuracy']:.3f} tail {metrics['tail_accuracy']} "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return metrics


def aggregate(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """Mean and std over seeds of each row's overall / head / medium / tail (and heads alone)."""
    table = {}
    for row in ORDER:
        stats = {}
        for key in KEYS:
            stats[key] = mean_std([s[row][key] for s in per_seed])
        for variant in per_seed[0][row].get("variants", {}):  # the CLS and DIST heads alone
            for key in ("average_accuracy", "tail_accuracy"):
                stats[f"{variant}_{key}"] = mean_std([s[row]["variants"][variant][key] for s in per_seed])
        table[row] = stats
    return table


def mean_std(values: list[float | None]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def fmt(stat: dict[str, float] | None) -> str:
    return "–" if stat is None else f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def write_report(path: Path, table: dict[str, dict], raw: dict[str, Any], args: argparse.Namespace,
                 counts: list[int], wall_s: float) -> None:
    lines = [
        "# DeiT-LT at small scale: does distillation from a flat CNN teacher lift the tail?",
        "",
        f"Generated by `python benchmarks/deit_lt.py{' --quick' if args.quick else ''}` "
        f"(config `{Path(args.config).relative_to(ROOT) if Path(args.config).is_relative_to(ROOT) else args.config}`, "
        f"seeds {args.seeds}, {wall_s / 60:.0f} min on this machine's CPU). Accuracy in % on the balanced "
        f"test set, mean ± std over seeds.",
        "",
        f"Training images per class (head -> tail): {counts}. Head: > {raw['metrics']['many_shot']} images, "
        f"tail: < {raw['metrics']['few_shot']}.",
        "",
        "| row | overall | head | medium | tail | CLS head alone | DIST head alone | DIST tail |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in ORDER:
        s = table[row]
        lines.append(f"| {row} | {fmt(s['average_accuracy'])} | {fmt(s['head_accuracy'])} | "
                     f"{fmt(s['medium_accuracy'])} | {fmt(s['tail_accuracy'])} | "
                     f"{fmt(s.get('cls_average_accuracy'))} | {fmt(s.get('dist_average_accuracy'))} | "
                     f"{fmt(s.get('dist_tail_accuracy'))} |")
    gain = {row: 100 * (table["deit_lt"]["tail_accuracy"]["mean"] - table[row]["tail_accuracy"]["mean"])
            for row in ("vit_ce", "vit_drw", "deit_lt_clean")}
    lines += ["", f"Tail accuracy of full DeiT-LT minus that of vit_ce: {gain['vit_ce']:+.1f} points; "
              f"minus vit_drw: {gain['vit_drw']:+.1f}; minus deit_lt_clean: {gain['deit_lt_clean']:+.1f}. The "
              f"prediction is the mean of the two heads; the DIST head alone is the one that follows the "
              f"teacher (last column)."]
    lines += ["", "Rows: see the docstring of `benchmarks/deit_lt.py`. The student is the config's "
              f"`{raw['model']['name']}` model ({raw['model']}); the teacher `{raw['teacher']['model']}` "
              f"trained with `{raw['teacher']['strategy']}` and {raw['teacher']['train']}."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds = args.seeds[:1]
    raw, out, started = base_config(args), Path(args.out), time.perf_counter()
    per_seed = [run_seed(raw, seed, out) for seed in args.seeds]
    table = aggregate(per_seed)
    config = parse_config(raw)
    counts = config.scenario.build(config.data.build(), config.seed).train_counts.tolist()
    wall_s = time.perf_counter() - started
    if args.report:
        write_report(Path(args.report), table, raw, args, counts, wall_s)
    tail_gain = table["deit_lt"]["tail_accuracy"]["mean"] - table["vit_ce"]["tail_accuracy"]["mean"]
    print(json.dumps({"benchmark": "deit_lt", "seeds": args.seeds, "config": args.config, "rows": table,
                      "deit_lt_tail_gain_over_vit_ce": tail_gain, "wall_s": round(wall_s, 1)}, indent=2))


if __name__ == "__main__":
    main()
