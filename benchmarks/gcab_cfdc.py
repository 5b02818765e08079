"""GCAB + CFDC against fine-tuning, LwF and EWC on one class-incremental stream (3 seeds).

    python benchmarks/gcab_cfdc.py                 # the reference run (~5 min on 2 busy cores)
    python benchmarks/gcab_cfdc.py --tiny          # smoke: 1 seed, 1 epoch, tiny data

Rows (same data, class order and seeds for all; ``clsim.experiment.run`` as ``clsim run``):

- ``finetune``, ``lwf``, ``ewc``: a timm ViT (``model: vit``) of the GCAB model's width and
  depth + 1 blocks (the GCAB model's class-attention block counted as a block), CLS token, one
  growing head;
- ``gcab``: the GCAB model (ConViT GPSA blocks + one gated class-attention block, a token and
  head per task), HAT gates, no drift compensation;
- ``gcab_cfdc``: the same with cascaded feature drift compensation (Cotogni et al. 2022).

Reports final average accuracy and forgetting (mean and std over seeds), the final model's
task-aware accuracy (told the task: how much each old task is still known, apart from how the
tasks' logits compete) and the accuracy matrices (first seed) of the best row (by mean final
accuracy) and of gcab_cfdc. Prints one JSON object on stdout and writes
``reports/gcab_cfdc.md`` (``--report``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from clsim.config import ExperimentConfig, parse_config  # noqa: E402
from clsim.experiment import run  # noqa: E402
from clsim.report.run_folder import CHECKPOINT  # noqa: E402

ROWS = ("finetune", "lwf", "ewc", "gcab", "gcab_cfdc")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The shared experiment: data, scenario, model sizes and training budget."""
    if args.tiny:
        data = {"name": "synthetic", "num_classes": 10, "samples_per_class": 20, "image_size": 8, "channels": 1}
        return {"data": data, "n_tasks": 5, "width": 16, "depth": 1, "heads": 2, "epochs": 1, "seeds": [0]}
    data = {"name": "digits"}
    return {"data": data, "n_tasks": 5, "width": args.width, "depth": args.depth, "heads": args.heads,
            "epochs": args.epochs, "seeds": list(range(args.seeds))}


def strategy_section(row: str, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "finetune": {"name": "finetune"},
        "lwf": {"name": "lwf", "lambda": 1.0, "temperature": 2.0},
        "ewc": {"name": "ewc", "lambda": args.ewc_lambda},
        "gcab": {"name": "gcab", "lambda": args.gcab_lambda, "s_max": args.s_max, "bce": args.loss == "bce"},
        "gcab_cfdc": {"name": "gcab_cfdc", "lambda": args.gcab_lambda, "s_max": args.s_max,
                      "projector_weight": args.projector_weight, "bce": args.loss == "bce"},
    }[row]


def config_for(row: str, seed: int, s: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One experiment file, as a dict: ``clsim run`` of it is what this row measures."""
    if row.startswith("gcab"):
        model = {"name": "gcab_vit", "embed_dim": s["width"], "depth": s["depth"], "num_heads": s["heads"]}
    else:  # same width; one more block stands for the class-attention block
        model = {"name": "vit", "embed_dim": s["width"], "depth": s["depth"] + 1, "num_heads": s["heads"]}
    return {
        "name": f"{row}_seed{seed}", "seed": seed, "data": s["data"],
        "scenario": {"name": "class_incremental", "n_tasks": s["n_tasks"]},
        "model": model, "strategy": strategy_section(row, args),
        "train": {"epochs": s["epochs"], "batch_size": args.batch_size, "lr": args.lr, "optimizer": "adam"},
    }


def run_row(row: str, s: dict[str, Any], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Every seed of one row: final accuracy, forgetting, task-aware accuracy, wall time, seed 0's matrix."""
    results, task_aware = [], []
    for seed in s["seeds"]:
        started = time.perf_counter()
        config = parse_config(config_for(row, seed, s, args))
        metrics = run(config, tmp / f"{row}_{seed}", quiet=True)
        results.append(metrics)
        task_aware.append(statistics.mean(task_aware_accuracy(config, tmp / f"{row}_{seed}")))
        log(f"{row} seed {seed}: average accuracy {metrics['average_accuracy']:.3f}, forgetting "
            f"{metrics['forgetting']:.3f}, task-aware {task_aware[-1]:.3f} ({time.perf_counter() - started:.0f} s)")
    return summarise([m["average_accuracy"] for m in results], [m["forgetting"] for m in results]) | {
        "task_aware_accuracy_mean": statistics.mean(task_aware),
        "task_aware_accuracy_std": statistics.stdev(task_aware) if len(task_aware) > 1 else 0.0,
        "accuracy_matrix_seed0": results[0]["accuracy_matrix"],
        "wall_s_per_run": round(statistics.mean(m["wall_time_s"] for m in results), 1),
    }


@torch.no_grad()
def task_aware_accuracy(config: ExperimentConfig, run_dir: Path) -> list[float]:
    """Per task, the final model's accuracy when told the task (argmax over its classes only).

    Separates what the representation still knows about an old task from how its logits
    compete with later tasks' (the class-incremental accuracy above). Reads the run's last
    checkpoint, growing the model one experience at a time as ``--resume`` does.
    """
    scenario = config.scenario.build(config.data.build(), config.seed)
    model = config.model.build(scenario.input_shape)
    for index in range(len(scenario)):
        model.grow(scenario.seen_classes(index))
    model.load_state_dict(torch.load(run_dir / CHECKPOINT, weights_only=False)["model"])
    model.eval()
    accuracy = []
    for exp in scenario.experiences:
        x, y = exp.test.get_batch(torch.arange(len(exp.test)))  # (B, C, H, W), (B,)
        classes = torch.tensor(exp.classes)
        pred = classes[model(x)[:, classes].argmax(dim=1)]
        accuracy.append(float((pred == y).float().mean()))
    return accuracy


def summarise(accuracy: list[float], forgetting: list[float]) -> dict[str, Any]:
    def std(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0
    return {"average_accuracy_mean": statistics.mean(accuracy), "average_accuracy_std": std(accuracy),
            "forgetting_mean": statistics.mean(forgetting), "forgetting_std": std(forgetting),
            "average_accuracy": accuracy, "forgetting": forgetting}


def markdown(result: dict[str, Any]) -> str:
    """``reports/gcab_cfdc.md``: settings, the table and the best row's accuracy matrix."""
    rows, s = result["rows"], result["settings"]
    lines = ["# GCAB + CFDC against fine-tuning, LwF and EWC", "",
             f"Generated by `{result['command']}` ({result['wall_s']:.0f} s, {result['threads']} thread(s)).", "",
             f"Stream: {json.dumps(s['data'])}, class-incremental, {s['n_tasks']} tasks; seeds {s['seeds']} "
             f"(class order, initial weights and batches; the same for every row). "
             f"{s['epochs']} epochs a task, Adam, lr {result['args']['lr']}, batch {result['args']['batch_size']}.",
             f"Models: `gcab_vit` width {s['width']}, {s['depth']} GPSA blocks + 1 gated class-attention block, "
             f"{s['heads']} heads; baselines `vit` width {s['width']}, {s['depth'] + 1} blocks, {s['heads']} heads.",
             f"GCAB rows: s_max {result['args']['s_max']}, lambda {result['args']['gcab_lambda']}, "
             f"projector weight {result['args']['projector_weight']}, loss {result['args']['loss']}; "
             f"EWC lambda {result['args']['ewc_lambda']}; LwF lambda 1, T 2.",
             "", "Final average accuracy and forgetting are class-incremental (no task id; clsim's metrics). "
             "Task-aware accuracy: the final model told each test image's task (argmax over that task's "
             "classes), averaged over tasks: what the model still knows apart from how tasks' logits compete.",
             "", "| strategy | final average accuracy | forgetting | task-aware accuracy (final) | s / run |",
             "|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['average_accuracy_mean']:.3f} ± {row['average_accuracy_std']:.3f} | "
                     f"{row['forgetting_mean']:.3f} ± {row['forgetting_std']:.3f} | "
                     f"{row['task_aware_accuracy_mean']:.3f} ± {row['task_aware_accuracy_std']:.3f} | "
                     f"{row['wall_s_per_run']} |")
    shown = dict.fromkeys([result["best"], "gcab_cfdc"])  # the best row, and GCAB + CFDC's own
    for name in (n for n in shown if n in rows):
        what = "the best row" if name == result["best"] else "the method"
        lines += ["", f"Accuracy matrix of {what}, `{name}` (seed {s['seeds'][0]}; row i = after task i, "
                      f"column j = test set of task j):", ""]
        lines += matrix_table(rows[name]["accuracy_matrix_seed0"])
    return "\n".join(lines + [""])


def matrix_table(matrix: list[list[float | None]]) -> list[str]:
    lines = ["| after \\ task | " + " | ".join(str(j) for j in range(len(matrix))) + " |",
             "|---" * (len(matrix) + 1) + "|"]
    for i, row in enumerate(matrix):
        lines.append(f"| {i} | " + " | ".join("" if a is None else f"{a:.2f}" for a in row) + " |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="smoke mode: 1 seed, 1 epoch, tiny data")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2, help="GPSA blocks before the class-attention block")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--s-max", type=float, default=800.0)
    parser.add_argument("--gcab-lambda", type=float, default=0.05)
    parser.add_argument("--projector-weight", type=float, default=0.001)
    parser.add_argument("--loss", choices=["bce", "ce"], default="bce", help="GCAB rows' loss (paper's code: bce)")
    parser.add_argument("--ewc-lambda", type=float, default=10000.0)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", type=Path, default=Path(__file__).resolve().parents[1] / "reports" / "gcab_cfdc.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    s = settings(args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gcab_bench_") as tmp:
        rows = {row: run_row(row, s, args, Path(tmp)) for row in args.rows}
    best = max(rows, key=lambda r: rows[r]["average_accuracy_mean"])
    command = "python benchmarks/gcab_cfdc.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"benchmark": "gcab_cfdc", "settings": s, "args": {k: str(v) if isinstance(v, Path) else v
                                                                for k, v in vars(args).items()},
              "rows": rows, "best": best, "wall_s": time.perf_counter() - started,
              "threads": args.threads, "command": command.strip()}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(markdown(result))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
