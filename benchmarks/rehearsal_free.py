"""Rehearsal-free continual learning on a pretrained tiny ViT: L2 on attention against the prompting methods.

    python benchmarks/rehearsal_free.py --threads 1    # the reference run (~25 min on one core)
    python benchmarks/rehearsal_free.py --tiny          # smoke: tiny data, 1 epoch, 1 seed, 1-point grid

Checks, at CPU scale, the claim of "A Closer Look at Rehearsal-Free Continual Learning" (Smith et
al., CVPR-W 2023, ImageNet-R table): from a pretrained ViT, an L2 penalty on the self-attention
(QKV) weights alone is at least as good as the prompting methods (L2P++, DualPrompt, CODA-Prompt),
and both beat EWC and plain fine-tuning.

1. Pretraining (from scratch, every run): a timm ViT (16 px, patch 4, ``--width`` / ``--depth``)
   learns ``--pretrain-classes`` generated classes jointly (``synthetic`` with data seed
   ``PRETRAIN_DATA_SEED``). Its backbone is written to ``--weights`` (safetensors).
2. The continual stream: ``--classes`` *other* generated classes (``synthetic``, data seed 0: other
   random prototypes than the pretraining ones, so no class is shared), class-incremental in
   ``--tasks`` tasks, every row starting from ``model.pretrained: --weights``.
3. Tuning: per row, the learning rate (and lambda for L2 / EWC) from the same grids, chosen on
   seed 0 by final average accuracy on a validation split (``data.validation_fraction``: held out
   of the training images; the test split is never seen while tuning).
4. The chosen settings over ``--seeds`` seeds (class order, head initialisation, batches).

Rows (the same data, epochs, optimiser, schedule, batch and past-logit masking for all; each a
``clsim.experiment.run`` of a config, as ``clsim run`` runs it): ``finetune`` (all weights),
``linear_probe`` (frozen backbone + head), ``l2_all``, ``l2_attention`` and ``ewc_attention``
(only QKV + head train, ``train.trainable``, as scenarios/imagenet_r.yaml), ``l2p``,
``dualprompt``, ``coda_prompt`` (prompt sizes scaled to the 17-token, 4-block ViT: see
``PROMPTS``) and ``joint`` (all classes as one task: the upper bound).

Writes ``reports/rehearsal_free.md`` and ``reports/rehearsal_free.json`` (``--report``,
``--json``) and prints the same JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from safetensors.torch import save_file  # noqa: E402

from clsim.config import parse_config  # noqa: E402
from clsim.engine.checkpoint import load_file  # noqa: E402
from clsim.experiment import run  # noqa: E402
from clsim.report.run_folder import CHECKPOINT  # noqa: E402

ROWS = ("finetune", "linear_probe", "l2_all", "l2_attention", "ewc_attention",
        "l2p", "dualprompt", "coda_prompt", "joint")
PROMPT_ROWS = ("l2p", "dualprompt", "coda_prompt")
PROMPT_MODELS = {"l2p": "l2p_vit", "dualprompt": "dualprompt_vit", "coda_prompt": "coda_prompt_vit"}
REGULARISED = ("l2_all", "l2_attention", "ewc_attention")
ATTENTION_ONLY = ["*.attn.qkv.*", "head.*"]  # what trains in the paper's L2 / EWC rows
PRETRAIN_DATA_SEED = 1000  # the pretraining classes' prototypes; the stream's are data seed 0
METRICS = ("average_accuracy", "average_incremental_accuracy", "forgetting", "plasticity")

# Prompt sizes for a 4-block ViT with 16 + 1 tokens (ImageNet-R's ViT-B/16: 12 blocks, 197 tokens).
# Prefix tokens are scaled with the token count (~1/4 of the tokens, as L2P++'s 5 x 10 of 197)
# and the prompted layers with the depth; pools with the number of tasks.
PROMPTS = {
    "l2p": {"pool_size": 10, "prompt_length": 4, "top_k": 2, "prompt_layers": [0]},  # code: 30, 20, 5, [0]
    "dualprompt": {"prompt_length": 4, "g_length": 2, "g_layers": [0], "e_layers": [1, 2]},  # 20, 6, [0,1], [2,3,4]
    "coda_prompt": {"prompt_length": 4, "prompt_layers": [0, 1, 2, 3]},  # 8, [0..4]; pool: 4 a task (code: 10)
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The shared experiment: data, model sizes, training budget, grids and seeds."""
    if args.tiny:
        return {"pretrain_classes": 6, "pretrain_samples": 20, "pretrain_epochs": 1, "classes": 10,
                "samples": 20, "tasks": 5, "width": 16, "depth": 4, "heads": 2, "epochs": 1,
                "batch_size": 16, "seeds": [0], "lr_grid": [1e-3], "lambda_grid": [1.0],
                "validation_fraction": 0.25, "noise": 1.0}
    return {"pretrain_classes": args.pretrain_classes, "pretrain_samples": args.pretrain_samples,
            "pretrain_epochs": args.pretrain_epochs, "classes": args.classes, "samples": args.samples,
            "tasks": args.tasks, "width": args.width, "depth": args.depth, "heads": args.heads,
            "epochs": args.epochs, "batch_size": args.batch_size, "seeds": list(range(args.seeds)),
            "lr_grid": args.lr_grid, "lambda_grid": args.lambda_grid,
            "validation_fraction": args.validation_fraction, "noise": args.noise}


def vit_sizes(s: dict[str, Any]) -> dict[str, Any]:
    return {"patch_size": 4, "embed_dim": s["width"], "depth": s["depth"], "num_heads": s["heads"]}


def pretrain(s: dict[str, Any], weights: Path, tmp: Path) -> dict[str, Any]:
    """Train the ViT jointly on the pretraining classes; write its backbone to ``weights``."""
    started = time.perf_counter()
    config = {
        "name": "pretrain", "seed": 0,
        "data": {"name": "synthetic", "num_classes": s["pretrain_classes"], "samples_per_class": s["pretrain_samples"],
                 "image_size": 16, "channels": 3, "seed": PRETRAIN_DATA_SEED},
        "scenario": {"name": "class_incremental", "n_tasks": 1},
        "model": {"name": "vit", **vit_sizes(s)},
        "strategy": {"name": "finetune"},
        "train": {"epochs": s["pretrain_epochs"], "batch_size": 64, "lr": 1e-3, "optimizer": "adamw",
                  "weight_decay": 0.05, "schedule": "cosine"},
    }
    metrics = run(parse_config(config), tmp / "pretrain", quiet=True)
    state = load_file(tmp / "pretrain" / CHECKPOINT, key="pretrain")["model"]
    backbone = {k.removeprefix("backbone."): v.contiguous() for k, v in state.items() if k.startswith("backbone.")}
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(backbone, str(weights))
    log(f"pretraining: {s['pretrain_classes']} classes, test accuracy {metrics['average_accuracy']:.3f} "
        f"({time.perf_counter() - started:.0f} s) -> {weights}")
    return {"config": config, "test_accuracy": metrics["average_accuracy"],
            "parameters": sum(v.numel() for v in backbone.values()), "wall_s": round(time.perf_counter() - started, 1)}


def model_section(row: str, s: dict[str, Any], weights: Path) -> dict[str, Any]:
    base = {**vit_sizes(s), "pretrained": str(weights)}
    if row not in PROMPT_ROWS:
        return {"name": "vit", **base}
    extra = {"coda_prompt": {"pool_size": 4 * s["tasks"], "n_tasks": s["tasks"]},
             "dualprompt": {"pool_size": s["tasks"]}}.get(row, {})
    return {"name": PROMPT_MODELS[row], **base, **PROMPTS[row], **extra}


def strategy_section(row: str, lam: float | None) -> dict[str, Any]:
    return {
        "finetune": {"name": "finetune", "mask_past": True}, "joint": {"name": "finetune", "mask_past": True},
        "linear_probe": {"name": "linear_probe", "mask_past": True},
        "l2_all": {"name": "l2", "lambda": lam, "params": "all", "mask_past": True},
        "l2_attention": {"name": "l2", "lambda": lam, "params": "attention", "mask_past": True},
        "ewc_attention": {"name": "ewc", "lambda": lam, "params": "attention", "mask_past": True},
        "l2p": {"name": "l2p", "pull_weight": 1.0}, "dualprompt": {"name": "dualprompt", "pull_weight": 1.0},
        "coda_prompt": {"name": "coda_prompt", "ortho_weight": 0.0},
    }[row]


def config_for(row: str, seed: int, s: dict[str, Any], weights: Path, setting: dict[str, float],
               *, validation: bool) -> dict[str, Any]:
    """One experiment file, as a dict: ``clsim run`` of it is what this row measures."""
    data = {"name": "synthetic", "num_classes": s["classes"], "samples_per_class": s["samples"],
            "image_size": 16, "channels": 3, "seed": 0, "noise": s["noise"],
            "validation_fraction": s["validation_fraction"] if validation else 0.0}
    train = {"epochs": s["epochs"], "batch_size": s["batch_size"], "lr": setting["lr"], "optimizer": "adam",
             "schedule": "cosine"}
    if row in ("l2_attention", "ewc_attention"):
        train["trainable"] = ATTENTION_ONLY
    return {"name": f"{row}_seed{seed}", "seed": seed, "data": data,
            "scenario": {"name": "class_incremental", "n_tasks": 1 if row == "joint" else s["tasks"]},
            "model": model_section(row, s, weights), "strategy": strategy_section(row, setting.get("lambda")),
            "train": train}


def measure(config: dict[str, Any], out: Path) -> dict[str, float | None]:
    """Run one config; its final / average incremental accuracy, forgetting and plasticity."""
    metrics = run(parse_config(config), out, quiet=True)
    matrix = metrics["accuracy_matrix"]
    single = len(matrix) == 1  # joint: one task, nothing to forget
    return {"average_accuracy": metrics["average_accuracy"],
            "average_incremental_accuracy": metrics["average_incremental_accuracy"],
            "forgetting": None if single else metrics["forgetting"],
            "plasticity": statistics.mean(matrix[i][i] for i in range(len(matrix))),
            "accuracy_matrix": matrix, "wall_s": metrics["wall_time_s"]}


def grid(row: str, s: dict[str, Any]) -> list[dict[str, float]]:
    """The same learning-rate grid for every row, crossed with the same lambda grid for L2 / EWC."""
    lambdas = s["lambda_grid"] if row in REGULARISED else [None]
    return [{"lr": lr} | ({"lambda": lam} if lam is not None else {})
            for lr, lam in itertools.product(s["lr_grid"], lambdas)]


def tune(row: str, s: dict[str, Any], weights: Path, tmp: Path) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The grid point with the best validation final accuracy on seed 0 (ties: the earlier point)."""
    tried = []
    for i, setting in enumerate(grid(row, s)):
        result = measure(config_for(row, s["seeds"][0], s, weights, setting, validation=True), tmp / f"tune_{row}_{i}")
        tried.append(setting | {"validation_accuracy": result["average_accuracy"]})
        log(f"  tune {row} {setting}: validation accuracy {result['average_accuracy']:.3f} ({result['wall_s']:.0f} s)")
    best = max(tried, key=lambda t: t["validation_accuracy"])
    return {k: v for k, v in best.items() if k != "validation_accuracy"}, tried


def evaluate(row: str, setting: dict[str, float], s: dict[str, Any], weights: Path, tmp: Path) -> dict[str, Any]:
    """Every seed of one row with its chosen setting: per-seed values, mean and std of each metric."""
    runs = []
    for seed in s["seeds"]:
        runs.append(measure(config_for(row, seed, s, weights, setting, validation=False), tmp / f"{row}_{seed}"))
        log(f"{row} seed {seed}: " + ", ".join(f"{k} {runs[-1][k]:.3f}" for k in METRICS if runs[-1][k] is not None))
    out: dict[str, Any] = {"setting": setting}
    for key in METRICS:
        values = [r[key] for r in runs]
        if None in values:
            out[key] = {"mean": None, "std": None, "per_seed": values}
            continue
        out[key] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "per_seed": values}
    out["accuracy_matrix_seed0"] = runs[0]["accuracy_matrix"]
    out["wall_s_per_run"] = round(statistics.mean(r["wall_s"] for r in runs), 1)
    return out


def clearly_above(rows: dict[str, Any], high: str, low: str, *, margin: float) -> dict[str, Any]:
    """``high`` beats ``low`` by at least ``margin`` and by more than twice their pooled seed std."""
    a, b = rows[high]["average_accuracy"], rows[low]["average_accuracy"]
    gap = a["mean"] - b["mean"]
    noise = (a["std"] ** 2 + b["std"] ** 2) ** 0.5
    return {"gap": gap, "pooled_std": noise, "holds": bool(gap >= margin and gap > 2 * noise)}


def checks(rows: dict[str, Any]) -> dict[str, Any]:
    """Whether the stream can tell methods apart, and the paper's direction."""
    mean = {r: rows[r]["average_accuracy"]["mean"] for r in rows}
    out: dict[str, Any] = {}
    if {"joint", "finetune"} <= set(rows):
        out["joint_clearly_above_finetune"] = clearly_above(rows, "joint", "finetune", margin=0.10)
    if {"joint", "linear_probe"} <= set(rows):
        out["linear_probe_clearly_below_joint"] = clearly_above(rows, "joint", "linear_probe", margin=0.05)
    prompts = [r for r in PROMPT_ROWS if r in rows]
    if "l2_attention" in rows and prompts:
        out["l2_attention_at_least_prompting"] = {r: bool(mean["l2_attention"] >= mean[r]) for r in prompts}
    weak = [r for r in ("ewc_attention", "finetune") if r in rows]
    if weak:
        better = ["l2_attention", *prompts] if "l2_attention" in rows else prompts
        out["above_ewc_and_finetune"] = {f"{b} > {w}": bool(mean[b] > mean[w]) for b in better for w in weak}
    values = [v for v in out.values() if isinstance(v, dict)]
    out["stream_can_differ"] = all(v["holds"] for k, v in out.items() if k.startswith(("joint_", "linear_probe_")))
    out["paper_direction_holds"] = all(all(d.values()) for k, d in out.items()
                                       if k in ("l2_attention_at_least_prompting", "above_ewc_and_finetune"))
    return out if values else {}


def fmt(metric: dict[str, Any]) -> str:
    if metric["mean"] is None:
        return "—"
    return f"{100 * metric['mean']:.1f} ± {100 * metric['std']:.1f}"


def markdown(result: dict[str, Any]) -> str:
    """``reports/rehearsal_free.md``: setting, table, the two stream checks and the paper's direction."""
    s, rows, c, p = result["settings"], result["rows"], result["checks"], result["pretraining"]
    lines = [
        "# Rehearsal-free CL on a pretrained tiny ViT: L2 on attention against prompting", "",
        f"Generated from scratch by `{result['command']}` ({result['wall_s'] / 60:.1f} min, "
        f"{result['threads']} thread(s)); rows in `reports/rehearsal_free.json`.", "",
        f"**Pretraining** (every run): timm ViT, 16 px, patch 4, width {s['width']}, depth {s['depth']}, "
        f"{s['heads']} heads ({p['parameters']:,} backbone parameters), jointly on {s['pretrain_classes']} "
        f"generated classes (`synthetic`, data seed {PRETRAIN_DATA_SEED}, {s['pretrain_samples']} images a class), "
        f"{s['pretrain_epochs']} epochs AdamW: test accuracy {100 * p['test_accuracy']:.1f} %. Weights: "
        f"`{result['weights']}`.",
        f"**Stream**: {s['classes']} other generated classes (data seed 0: no prototype shared with pretraining), "
        f"pixel noise {s['noise']} (pretraining: 0.5; a domain shift, as ImageNet -> ImageNet-R), "
        f"{s['samples']} images a class (80/20 train/test), class-incremental in {s['tasks']} tasks, every row "
        f"from `model.pretrained` = that file. {s['epochs']} epochs a task for every row (joint: {s['epochs']} "
        f"epochs over all classes), Adam, cosine schedule, batch {s['batch_size']}, past-class logits masked "
        f"in the loss; seeds {s['seeds']} (class order, head init, batches).",
        f"**Tuning**: lr from {s['lr_grid']} for every row, lambda from {s['lambda_grid']} for L2 / EWC "
        f"(loss + lambda/2 sum F (theta - theta*)^2; EWC's Fisher: `batch`, the authors' estimator), chosen on "
        f"seed {s['seeds'][0]} by final accuracy on a validation split ({s['validation_fraction']:.0%} of each "
        f"class's training images held out; the test split never seen while tuning).",
        f"**Prompt sizes** (scaled from ImageNet-R's ViT-B/16): {json.dumps(result['prompts'])}; CODA-Prompt "
        f"pool {4 * s['tasks']} (4 components a task), DualPrompt {s['tasks']} E-prompts.", "",
        "Metrics (%, mean ± std over seeds): final average accuracy, average incremental accuracy, "
        "forgetting (mean drop from an old task's best accuracy), plasticity (mean accuracy on each task "
        "right after learning it).", "",
        "| row | what trains | chosen setting | final acc. | avg. incremental acc. | forgetting | plasticity |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        setting = ", ".join(f"{k} {v:g}" for k, v in row["setting"].items())
        lines.append(f"| {name} | {TRAINS[name]} | {setting} | " + " | ".join(fmt(row[k]) for k in METRICS) + " |")
    lines += ["", "## Can the stream tell methods apart?", ""]
    for key in ("joint_clearly_above_finetune", "linear_probe_clearly_below_joint"):
        if key in c:
            v = c[key]
            lines.append(f"- `{key}`: **{v['holds']}** (gap {100 * v['gap']:.1f} points, pooled std "
                         f"{100 * v['pooled_std']:.1f}; needs >= {10 if 'finetune' in key else 5} points and > 2 std)")
    lines += ["", "## The paper's direction", "",
              "Smith et al. (ImageNet-R, ViT-B/16): L2 on attention >= CODA-Prompt > DualPrompt > L2P++, "
              "all above EWC and fine-tuning.", ""]
    for key in ("l2_attention_at_least_prompting", "above_ewc_and_finetune"):
        if key in c:
            lines.append(f"- `{key}`: " + ", ".join(f"{k}: **{v}**" for k, v in c[key].items()))
    lines += ["", f"Paper's direction holds here: **{c.get('paper_direction_holds')}**.", ""]
    return "\n".join(lines + ANALYSIS + [""])


# Reading of the reference run (the tables above are regenerated by every run; this text is not).
ANALYSIS: list[str] = [
    "## Reading (reference run of 2026-12-03; the numbers above are regenerated, this text is not)", "",
    "- The stream separates methods: joint is 70 points above fine-tuning and the frozen backbone 36 "
    "points below joint; every row learns each task (plasticity >= 66 % on 4-class tasks, chance 25 %).",
    "- Half of the paper's direction shows: L2 on QKV (53.0) and all three prompting methods (50-58) are "
    "far above EWC on QKV (35.0) and fine-tuning (22.6). The other half does not: L2 on QKV beats L2P++ "
    "(50.2) but not DualPrompt (56.2) or CODA-Prompt (58.0), and not even the frozen linear probe (57.0); "
    "the gaps are 3-5 points, about one pooled seed std. Among the prompts the paper's order "
    "CODA > DualPrompt > L2P++ does show.",
    "- Why: training the QKV projections buys no plasticity here. L2 on QKV learns each new task no better "
    "than the probe (plasticity 69.2 vs 71.3) and forgets as much (20.2 vs 17.8). Without the penalty "
    "(lambda 1e-6, lr 0.01, seed 0, validation split) QKV-only training still reaches only 70.6 plasticity "
    "and forgets 56.6, while fine-tuning every weight reaches 96. The stream's shift from pretraining "
    "is pixel noise (1.0 vs 0.5), a low-level shift that the patch embedding and MLPs would have to "
    "absorb; the attention weights cannot, so moving them only adds drift, and the best lambda keeps "
    "them near the pretrained weights, i.e. close to the probe. On ImageNet-R the QKV fine-tuning of "
    "ViT-B/16 does gain over the frozen features, and that gain is what puts L2 first. The budget adds "
    "to this: 5 epochs x 10 steps a task leave every head-trained row near 70 % plasticity, while the "
    "paper runs 50 epochs.",
    "- Grid edges, checked afterwards with single seed-0 validation runs of the same configs at lrs "
    "outside the grid: fine-tuning 3e-4 -> 35.6 (25.9 at 1e-3; its optimum lies below the grid, yet still "
    "~15 points under every other row); probe 3e-2 -> 55.9 (53.1); DualPrompt 3e-2 -> 53.1 (50.6); L2 on "
    "QKV 3e-2 -> 46.3 (49.4); L2P 3e-2 -> 45.6 (54.7); CODA 3e-2 -> 50.0 (56.6). A wider lr grid would "
    "help the probe and DualPrompt, not L2 on QKV, so it would not reverse the finding.",
    "- EWC's first task has an anchor with zero Fisher (as in the authors' code), so it trains "
    "unpenalised; from then on, with the batch-sum Fisher, no lambda in the grid held QKV as well as "
    "L2 did (seed spread 8.9 points).",
]

TRAINS = {"finetune": "all", "linear_probe": "head", "l2_all": "all (L2 on all)",
          "l2_attention": "QKV + head (L2 on QKV)", "ewc_attention": "QKV + head (EWC on QKV)",
          "l2p": "prompts, keys, head", "dualprompt": "prompts, keys, head",
          "coda_prompt": "components, keys, attention, head", "joint": "all (one task)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="smoke: tiny data, 1 epoch, 1 seed, 1-point grid")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--pretrain-classes", type=int, default=48)
    parser.add_argument("--pretrain-samples", type=int, default=100, help="images a pretraining class")
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--classes", type=int, default=20, help="classes in the continual stream")
    parser.add_argument("--samples", type=int, default=100, help="images a stream class (80/20 train/test)")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--noise", type=float, default=1.0,
                        help="pixel noise of the stream (pretraining: 0.5), a domain shift for the frozen features")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5, help="epochs a task, every row")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr-grid", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--lambda-grid", type=float, nargs="+", default=[1.0, 100.0, 10000.0])
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "synthetic_vit16.safetensors",
                        help="where the pretrained backbone is written (the scenario's model.pretrained)")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "rehearsal_free.md")
    parser.add_argument("--json", type=Path, default=ROOT / "reports" / "rehearsal_free.json")
    parser.add_argument("--markdown-only", action="store_true",
                        help="train nothing: rewrite --report from the rows in --json (after editing ANALYSIS)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.markdown_only:
        args.report.write_text(markdown(json.loads(args.json.read_text())))
        return
    torch.set_num_threads(args.threads)
    s = settings(args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rehearsal_free_") as tmp:
        pretraining = pretrain(s, args.weights, Path(tmp))
        rows, tuning = {}, {}
        for row in args.rows:
            setting, tuning[row] = tune(row, s, args.weights, Path(tmp))
            rows[row] = evaluate(row, setting, s, args.weights, Path(tmp))
    command = "python benchmarks/rehearsal_free.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"benchmark": "rehearsal_free", "settings": s, "prompts": PROMPTS, "pretraining": pretraining,
              "weights": str(args.weights.resolve().relative_to(ROOT)) if args.weights.resolve().is_relative_to(ROOT)
              else str(args.weights),
              "rows": rows, "tuning": tuning, "checks": checks(rows), "wall_s": time.perf_counter() - started,
              "threads": args.threads, "command": command.strip()}
    for path, text in ((args.json, json.dumps(result, indent=1)), (args.report, markdown(result))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + ("\n" if path == args.json else ""))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
