"""GCAB + CFDC against fine-tuning, LwF and EWC on one class-incremental stream, from scratch.

    python benchmarks/gcab_cfdc.py --threads 1     # the reference run (reports/gcab_cfdc.{md,json})
    python benchmarks/gcab_cfdc.py --tiny          # smoke: tiny data, 1 epoch, 1 seed, 1-point grids

Checks, at CPU scale, the claim of Cotogni et al. ("Exemplar-free Continual Learning of Vision
Transformers via Gated Class-Attention and Cascaded Feature Drift Compensation", arXiv
2211.12292, CIFAR-100 / ImageNet-100 tables): GCAB + CFDC is above the exemplar-free baselines
(fine-tuning, LwF, EWC) on last and average incremental accuracy, with lower forgetting.

Stream: ``synthetic`` (generated, 16 px RGB), ``--classes`` classes in ``--tasks`` tasks (by
default 50 in 5 tasks of 10, as many a task as the paper's 10-step CIFAR-100: with 4 a task the
CFDC rows lose most of their later tasks' images to old heads, docs/gcab.md, causes 3 and 4);
the class order, initial weights and batches follow the seed; the same data and seeds for every
row.

Rows (each a ``clsim.experiment.run`` of a config, as ``clsim run`` runs it; the same epochs,
optimiser, lr and batch for all):

- ``finetune``, ``lwf``, ``ewc``: timm's ConViT with the GCAB model's backbone (``--depth`` GPSA
  blocks, width ``--width``, ``--heads`` heads, patch 4) and one more self-attention block with a
  CLS token where GCAB has its class-attention block; one growing head;
- ``gcab``: the GCAB model (the same GPSA blocks + the gated class-attention block, a token and a
  head per task), HAT gates, no drift compensation (the paper's ablation);
- ``gcab_cfdc_paper`` / ``gcab_cfdc_residual``: GCAB + CFDC with the paper's projector / clsim's
  zero-initialised residual one, trained as the paper's code trains them (old tokens read the
  raw features in training, the projector chain only at test time);
- ``gcab_cfdc_chain``: clsim's departure for the failure those two rows showed on 4 classes a
  task (docs/gcab.md, "Why later tasks were not learnt"): residual projector, old tokens read
  the projector chain in training too and the classification loss trains the newest projector
  (``project_in_training``, ``classification_trains_projector``), so old heads learn to reject
  new images where they read them at test time; ``projector_weight`` tuned.

Tuning (seed 0 only, stated in the report): each method's lambda (LwF's distillation weight,
EWC's penalty, GCAB's sparsity) from the same relative grid, ``--lambda-grid`` times the
method's default, by final average accuracy on a validation split (``data.validation_fraction``
held out of the training images; the test split is never seen while tuning). Fine-tuning has no
lambda; the lr is the same for every row and not tuned. All GCAB rows use the lambda tuned on the
``gcab_cfdc_paper`` row; then ``gcab_cfdc_chain``'s projector weight is tuned the same way (the
same relative grid times 0.01), with that lambda.

Writes ``reports/gcab_cfdc.md`` and ``reports/gcab_cfdc.json`` (``--report``, ``--json``) and
prints the same JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from clsim.config import parse_config  # noqa: E402
from clsim.experiment import run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("finetune", "lwf", "ewc", "gcab", "gcab_cfdc_paper", "gcab_cfdc_residual", "gcab_cfdc_chain")
BASELINES = ("finetune", "lwf", "ewc")
METHOD_ROWS = ("gcab_cfdc_paper", "gcab_cfdc_residual", "gcab_cfdc_chain")
DEFAULT_LAMBDA = {"lwf": 1.0, "ewc": 1000.0, "gcab": 1.0}  # the grid's x1 point per method
DEFAULT_PROJECTOR_WEIGHT = 0.01  # the chain row's x1 point (the paper's code: 0.001, no chain in training)
TUNED = ("lwf", "ewc", "gcab_cfdc_paper")  # tuned rows; the other GCAB rows take the latter's lambda
METRICS = ("average_incremental_accuracy", "last_accuracy", "forgetting", "plasticity")
NO_CHAIN = ("no_chain_plasticity", "no_chain_last_accuracy")  # CFDC rows' variant with every task on raw features
Setting = dict[str, float]  # a row's tuned values: "lambda" and, for the chain row, "projector_weight"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The shared experiment: data, stream, model sizes, training budget, seeds and grids."""
    if args.tiny:
        return {"classes": 10, "tasks": 5, "samples": 12, "image_size": 8, "width": 16, "depth": 1,
                "heads": 2, "epochs": 1, "batch_size": 16, "lr": args.lr, "seeds": [0],
                "lambda_grid": [1.0], "validation_fraction": 0.25, "gate_lr_scale": args.gate_lr_scale}
    return {"classes": args.classes, "tasks": args.tasks, "samples": args.samples, "image_size": 16,
            "width": args.width, "depth": args.depth, "heads": args.heads, "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": args.lr, "seeds": list(range(args.seeds)),
            "lambda_grid": args.lambda_grid, "validation_fraction": args.validation_fraction,
            "gate_lr_scale": args.gate_lr_scale}


def method(row: str) -> str:
    """The lambda family of a row: lwf, ewc or gcab."""
    return "gcab" if row.startswith("gcab") else row


def model_section(row: str, s: dict[str, Any]) -> dict[str, Any]:
    """The GCAB model for GCAB rows; for baselines timm's ConViT with the same GPSA backbone."""
    patch = 4 if s["image_size"] >= 16 else 2
    if row.startswith("gcab"):
        projector = "paper" if row.endswith("paper") else "residual"
        return {"name": "gcab_vit", "embed_dim": s["width"], "depth": s["depth"], "num_heads": s["heads"],
                "patch_size": patch, "projector": projector, "gate_lr_scale": s["gate_lr_scale"]}
    # timm's ConVit multiplies embed_dim by num_heads; GPSA up to local_up_to_layer, then one
    # self-attention block with the CLS token (where GCAB has its class-attention block)
    options = {"img_size": s["image_size"], "patch_size": patch, "embed_dim": s["width"] // s["heads"],
               "depth": s["depth"] + 1, "num_heads": s["heads"], "local_up_to_layer": s["depth"]}
    return {"name": "timm", "arch": "convit_tiny", "options": options}


def strategy_section(row: str, lam: float | None, weight: float | None = None) -> dict[str, Any]:
    if row == "finetune":
        return {"name": "finetune"}
    if row == "lwf":
        return {"name": "lwf", "lambda": lam, "temperature": 2.0}
    if row == "ewc":
        return {"name": "ewc", "lambda": lam}
    if row == "gcab":
        return {"name": "gcab", "lambda": lam}
    if row == "gcab_cfdc_chain":  # old heads read the chain in training, which trains the projector
        return {"name": "gcab_cfdc", "lambda": lam, "project_in_training": True,
                "classification_trains_projector": True, "projector_weight": weight}
    return {"name": "gcab_cfdc", "lambda": lam}  # the paper's training: old tokens read raw features


def config_for(row: str, seed: int, s: dict[str, Any], setting: Setting, *, validation: bool) -> dict[str, Any]:
    """One experiment file, as a dict: ``clsim run`` of it is what this row measures."""
    data = {"name": "synthetic", "num_classes": s["classes"], "samples_per_class": s["samples"],
            "image_size": s["image_size"], "channels": 3, "seed": 0,
            "validation_fraction": s["validation_fraction"] if validation else 0.0}
    return {"name": f"{row}_seed{seed}", "seed": seed, "data": data,
            "scenario": {"name": "class_incremental", "n_tasks": s["tasks"]},
            "model": model_section(row, s),
            "strategy": strategy_section(row, setting.get("lambda"), setting.get("projector_weight")),
            "train": {"epochs": s["epochs"], "batch_size": s["batch_size"], "lr": s["lr"], "optimizer": "adam"}}


def measure(config: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run one config: its average incremental / last accuracy, forgetting, plasticity and matrix."""
    metrics = run(parse_config(config), out, quiet=True)
    matrix = metrics["accuracy_matrix"]
    diagonal = right_after(matrix)
    result = {"average_incremental_accuracy": metrics["average_incremental_accuracy"],
              "last_accuracy": metrics["average_accuracy"], "forgetting": metrics["forgetting"],
              "plasticity": statistics.mean(diagonal), "plasticity_per_task": diagonal,
              "accuracy_matrix": matrix, "wall_s": metrics["wall_time_s"]}
    if "no_chain" in metrics.get("variants", {}):  # CFDC rows: every task reading the current features
        raw = metrics["variants"]["no_chain"]
        result |= {"no_chain_plasticity": statistics.mean(right_after(raw["accuracy_matrix"])),
                   "no_chain_last_accuracy": raw["average_accuracy"]}
    return result


def right_after(matrix: list[list[float | None]]) -> list[float]:
    """Each task's accuracy right after learning it: the matrix's diagonal."""
    return [matrix[i][i] for i in range(len(matrix))]


def measure_job(job: tuple[str, dict[str, Any], Path, int]) -> dict[str, Any]:
    """One run in a worker process (its own torch threads): ``(label, config, out dir, threads)``."""
    label, config, out, threads = job
    torch.set_num_threads(threads)
    result = measure(config, out)
    log(f"{label}: " + ", ".join(f"{k} {result[k]:.3f}" for k in METRICS) + f" ({result['wall_s']:.0f} s)")
    return result


def run_jobs(jobs: list[tuple[str, dict[str, Any], Path, int]], workers: int) -> list[dict[str, Any]]:
    """Every job, ``workers`` processes at a time; each run's numbers depend only on its config."""
    if workers <= 1:
        return [measure_job(job) for job in jobs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(measure_job, jobs))


def grid(row: str, s: dict[str, Any], base: Setting) -> list[Setting]:
    """The settings tried for a row: lambda, or (chain row) the projector weight, times the grid."""
    if row == "gcab_cfdc_chain":
        return [base | {"projector_weight": DEFAULT_PROJECTOR_WEIGHT * f} for f in s["lambda_grid"]]
    return [{"lambda": DEFAULT_LAMBDA[method(row)] * f} for f in s["lambda_grid"]]


def tune(rows: list[str], s: dict[str, Any], tmp: Path, args: argparse.Namespace, base: Setting | None = None
         ) -> tuple[dict[str, Setting], dict[str, list[dict[str, Any]]]]:
    """Per row, the setting with the best validation last accuracy on seed 0 (ties: the earlier point)."""
    points = [(row, i, setting) for row in rows for i, setting in enumerate(grid(row, s, base or {}))]
    jobs = [(f"tune {row} {label(setting)} (validation)",
             config_for(row, s["seeds"][0], s, setting, validation=True), tmp / f"tune_{row}_{i}", args.threads)
            for row, i, setting in points]
    chosen, tuning = {}, {}
    for (row, _, setting), result in zip(points, run_jobs(jobs, args.jobs)):
        tuning.setdefault(row, []).append(setting | {"validation_last_accuracy": result["last_accuracy"],
                                                     "validation_plasticity": result["plasticity"]})
    for row, tried in tuning.items():
        best = max(tried, key=lambda t: t["validation_last_accuracy"])
        chosen[row] = {k: best[k] for k in ("lambda", "projector_weight") if k in best}
    return chosen, tuning


def label(setting: Setting) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in setting.items())


def evaluate(chosen: dict[str, Setting], s: dict[str, Any], tmp: Path, args: argparse.Namespace
             ) -> dict[str, dict[str, Any]]:
    """Every seed of every row with its chosen setting, on the test split."""
    points = [(row, seed) for row in args.rows for seed in s["seeds"]]
    jobs = [(f"{row} seed {seed}", config_for(row, seed, s, chosen[row], validation=False),
             tmp / f"{row}_{seed}", args.threads) for row, seed in points]
    results = run_jobs(jobs, args.jobs)
    return {row: summarise(chosen[row], [r for (name, _), r in zip(points, results) if name == row])
            for row in args.rows}


def summarise(setting: Setting, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row over its seeds: per-seed values, mean and std of each metric, seed 0's matrix."""
    out: dict[str, Any] = {"lambda": None} | setting  # fine-tuning has no lambda
    for key in METRICS + tuple(k for k in NO_CHAIN if k in runs[0]):
        out[key] = spread([r[key] for r in runs])
    per_task = list(zip(*(r["plasticity_per_task"] for r in runs)))  # (tasks, seeds)
    out["plasticity_per_task_mean"] = [statistics.mean(t) for t in per_task]
    out["plasticity_per_task_min"] = [min(t) for t in per_task]
    out["accuracy_matrix_seed0"] = runs[0]["accuracy_matrix"]
    out["wall_s_per_run"] = round(statistics.mean(r["wall_s"] for r in runs), 1)
    return out


def spread(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def fmt(metric: dict[str, Any]) -> str:
    return f"{metric['mean']:.3f} ± {metric['std']:.3f}"


def verdict(rows: dict[str, dict[str, Any]], s: dict[str, Any]) -> list[str]:
    """The paper's direction, checked row against row, and whether every row learns every task."""
    lines = []
    baselines = [b for b in BASELINES if b in rows]
    for name in (m for m in METHOD_ROWS if m in rows):
        row = rows[name]
        for key, better in (("last_accuracy", max), ("average_incremental_accuracy", max), ("forgetting", min)):
            best_base = better(baselines, key=lambda b: rows[b][key]["mean"]) if baselines else None
            if best_base is None:
                continue
            ours, theirs = row[key]["mean"], rows[best_base][key]["mean"]
            holds = ours > theirs if better is max else ours < theirs
            lines.append(f"- `{name}` {key.replace('_', ' ')} {ours:.3f} vs the best baseline "
                         f"(`{best_base}`) {theirs:.3f}: {'as the paper' if holds else 'NOT as the paper'}.")
    return lines


def learnt(rows: dict[str, dict[str, Any]], s: dict[str, Any]) -> list[str]:
    """Per row, the lowest plasticity of any task (over seeds) against chance (1 / seen classes)."""
    per_task = s["classes"] // s["tasks"]
    lines = []
    for name, row in rows.items():
        lows = row["plasticity_per_task_min"]
        chances = [1 / (per_task * (i + 1)) for i in range(len(lows))]
        worst = min(range(len(lows)), key=lambda i: lows[i] - chances[i])
        ok = all(low >= 2 * c for low, c in zip(lows, chances))
        lines.append(f"- `{name}`: task means {', '.join(f'{v:.2f}' for v in row['plasticity_per_task_mean'])}; "
                     f"lowest over seeds {lows[worst]:.2f} on task {worst} (chance {chances[worst]:.2f}): "
                     f"{'every task learnt (all >= 2x chance)' if ok else 'NOT every task learnt'}.")
    return lines


def no_chain_section(rows: dict[str, dict[str, Any]]) -> list[str]:
    """CFDC rows with and without the projector chain at test time: learnt, then lost in it?"""
    cfdc = [name for name, row in rows.items() if NO_CHAIN[0] in row]
    if not cfdc:
        return []
    lines = ["", "### CFDC rows read without the projector chain", "",
             "The same models, every task's token reading the current features at test time (the `no_chain` "
             "prediction variant, as in training): plasticity there says whether each task was learnt; the gap "
             "to the row's own plasticity is what the old heads take from new images through the chain.", "",
             "| row | plasticity (chain) | plasticity (no chain) | last accuracy (chain) | last accuracy (no chain) |",
             "|---|---|---|---|---|"]
    for name in cfdc:
        row = rows[name]
        lines.append(f"| {name} | {fmt(row['plasticity'])} | {fmt(row['no_chain_plasticity'])} | "
                     f"{fmt(row['last_accuracy'])} | {fmt(row['no_chain_last_accuracy'])} |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    """``reports/gcab_cfdc.md``: settings, tuning, the table, the verdicts and seed 0's matrices."""
    rows, s = result["rows"], result["settings"]
    lines = ["# GCAB + CFDC against fine-tuning, LwF and EWC", "",
             f"Generated from scratch by `{result['command']}` ({result['wall_s'] / 60:.1f} min, "
             f"{result['threads']} thread(s)); the rows are in `reports/gcab_cfdc.json`.", "",
             f"Stream: `synthetic` (generated, {s['image_size']} px RGB), {s['classes']} classes in {s['tasks']} "
             f"class-incremental tasks of {s['classes'] // s['tasks']}, {s['samples']} images a class; seeds "
             f"{s['seeds']} (class order, initial weights, batches), the same data and seeds for every row. "
             f"{s['epochs']} epochs a task, Adam, lr {s['lr']}, batch {s['batch_size']}.",
             f"Backbone for every row: {s['depth']} ConViT GPSA blocks, width {s['width']}, {s['heads']} heads, "
             f"patch 4; then one block: GCAB's gated class-attention block (GCAB rows) or a self-attention "
             f"block with a CLS token (baselines: timm's ConViT, `local_up_to_layer` {s['depth']}).",
             f"GCAB rows: s_max 800, BCE, gate step-size multiplier `gate_lr_scale` {s['gate_lr_scale']}, "
             f"CFDC as the paper trains it (old tokens read the raw features in training, the projector chain "
             f"at test time), projector `paper` or `residual`; `gcab_cfdc_chain` (clsim's departure, not the "
             f"paper's): residual projector, old tokens read the chain in training too and the classification "
             f"loss trains the newest projector.", "",
             "## Tuning (seed 0 only, validation split held out of the training images)", "",
             f"Grid: {s['lambda_grid']} x each method's default lambda {DEFAULT_LAMBDA} (`gcab_cfdc_chain`: x its "
             f"default projector weight {DEFAULT_PROJECTOR_WEIGHT}, with the GCAB lambda chosen first); chosen by "
             "validation last accuracy. The lr is not tuned (the same for every row).", "",
             "| row | setting | validation last accuracy | validation plasticity |", "|---|---|---|---|"]
    for name, tried in result["tuning"].items():
        for t in tried:
            setting = {k: t[k] for k in ("lambda", "projector_weight") if k in t}
            mark = " (chosen)" if all(rows.get(name, {}).get(k) == v for k, v in setting.items()) else ""
            lines.append(f"| {name} | {label(setting)}{mark} | {t['validation_last_accuracy']:.3f} | "
                         f"{t['validation_plasticity']:.3f} |")
    lines += ["", f"## Results ({len(s['seeds'])} seeds, mean ± std, test split)", "",
              "Average incremental accuracy: mean over steps of the accuracy on all tasks seen so far; last "
              "accuracy: after the last task, over all tasks; forgetting: mean drop from each old task's best; "
              "plasticity: each task's accuracy right after learning it (no task id anywhere).", "",
              "| row | setting | average incremental accuracy | last accuracy | forgetting | plasticity | s / run |",
              "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        setting = label({k: row[k] for k in ("lambda", "projector_weight") if row.get(k) is not None})
        lines.append(f"| {name} | {setting} | " + " | ".join(fmt(row[k]) for k in METRICS)
                     + f" | {row['wall_s_per_run']} |")
    lines += ["", "## The paper's direction", "",
              "The paper: GCAB + CFDC above the exemplar-free baselines (fine-tuning, LwF, EWC) on last and "
              "average incremental accuracy, with lower forgetting. What came out:", ""]
    lines += verdict(rows, s)
    lines += ["", "## Every task learnt? (plasticity per task)", ""] + learnt(rows, s)
    lines += no_chain_section(rows)
    for name in rows:
        lines += ["", f"Accuracy matrix of `{name}` (seed {s['seeds'][0]}; row i = after task i, column j = "
                      f"test set of task j):", ""] + matrix_table(rows[name]["accuracy_matrix_seed0"])
    return "\n".join(lines + [""])


def matrix_table(matrix: list[list[float | None]]) -> list[str]:
    lines = ["| after \\ task | " + " | ".join(str(j) for j in range(len(matrix))) + " |",
             "|---" * (len(matrix) + 1) + "|"]
    for i, row in enumerate(matrix):
        lines.append(f"| {i} | " + " | ".join("" if a is None else f"{a:.2f}" for a in row) + " |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="smoke mode: tiny data, 1 epoch, 1 seed, 1-point grids")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--classes", type=int, default=50, help="generated classes (10 a task: see docs/gcab.md, cause 4)")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--samples", type=int, default=80, help="generated images a class (train + test)")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2, help="GPSA blocks before the last block")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gate-lr-scale", type=float, default=100.0, help="GCAB rows' model.gate_lr_scale")
    parser.add_argument("--lambda-grid", type=float, nargs="+", default=[0.1, 1.0, 10.0],
                        help="factors of each tuned method's default lambda")
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (processes); numbers do not depend on it")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "gcab_cfdc.md")
    parser.add_argument("--json", type=Path, default=ROOT / "reports" / "gcab_cfdc.json")
    args = parser.parse_args(argv)
    if args.classes % args.tasks or args.classes < 2 * args.tasks:  # the report's chance is per task
        parser.error(f"--classes {args.classes}: expected a multiple of --tasks {args.tasks}, "
                     "with at least 2 classes a task")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    s = settings(args)
    started = time.perf_counter()
    gcab_rows = [r for r in args.rows if r.startswith("gcab")]
    tuned = [r for r in TUNED if r in args.rows or (r == "gcab_cfdc_paper" and gcab_rows)]
    with tempfile.TemporaryDirectory(prefix="gcab_bench_") as tmp:
        chosen, tuning = tune(tuned, s, Path(tmp), args)
        chosen |= {"finetune": {}} | {r: chosen["gcab_cfdc_paper"] for r in gcab_rows}
        if "gcab_cfdc_chain" in args.rows:  # its projector weight, with the GCAB lambda just chosen
            more, more_tuning = tune(["gcab_cfdc_chain"], s, Path(tmp), args, base=chosen["gcab_cfdc_paper"])
            chosen |= more
            tuning |= more_tuning
        rows = evaluate(chosen, s, Path(tmp), args)
    command = "python benchmarks/gcab_cfdc.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"benchmark": "gcab_cfdc", "settings": s, "tuning": tuning, "rows": rows,
              "wall_s": time.perf_counter() - started, "threads": args.threads, "jobs": args.jobs,
              "command": command.strip()}
    for path, text in ((args.report, markdown(result)), (args.json, json.dumps(result, indent=1))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + ("" if text.endswith("\n") else "\n"))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
