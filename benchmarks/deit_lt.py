"""DeiT-LT against plain-ViT long-tail baselines on one long-tailed stream: overall / head / medium / tail.

    python benchmarks/deit_lt.py                  # 5 seeds, scenarios/synthetic_lt.yaml
    python benchmarks/deit_lt.py --quick          # 1 seed, 2 epochs, few images (the smoke test)

Rangwani et al., "DeiT-LT: Distillation Strikes Back for Vision Transformer Training on
Long-Tailed Datasets" (CVPR 2024; code github.com/val-iisc/DeiT-LT). The paper's direction:
DeiT-LT's tail and overall accuracy above a ViT trained from scratch with CE and with the
long-tail baselines (DRW, logit adjustment); distilling on out-of-distribution images (a teacher
trained WITHOUT the student's strong augmentations) better than in-distribution; DRW on the
distillation loss lifting the tail.

Every row trains on the same data, from the same seeds, with the config's student size,
optimiser and epochs (everything comes from ``--config``; a row changes only what its name says):

- ``vit_ce_plain``: the student without a teacher and without strong augmentation: both heads
  learn the labels by CE (``deit_lt`` with ``distillation: none, augment: false, drw: false``).
- ``vit_ce``: the same with the DeiT-LT recipe (RandAugment, Mixup/CutMix, label smoothing,
  random erasing).
- ``vit_drw``: + DRW (Cao et al.) on both heads from 4/5 of the epochs (``drw_cls: true``).
- ``vit_la``: the recipe with logit-adjusted CE (Menon et al., tau 1) on the mean of the heads
  (``deit_lt_teacher`` with the student: the same augmentations, the LA loss).
- ``teacher``: the OOD teacher alone: the config's CNN teacher (LA + SAM, no strong augmentation).
- ``teacher_id``: the in-distribution teacher alone: the same CNN, LA + SAM, trained on the
  student's strong augmentations (``deit_lt_teacher``).
- ``deit_lt``: DeiT-LT: hard distillation from ``teacher`` on the strongly augmented batch + DRW.
- ``deit_lt_no_drw``: the same without DRW.
- ``deit_lt_id`` / ``deit_lt_id_no_drw``: distilled from ``teacher_id`` instead (the paper's
  in-distribution ablation), with and without DRW.
- ``deit_lt_dhvt``: ``deit_lt`` with a DHVT student (``dhvt_distilled``, the config's student sizes).

The two teachers are trained once per seed and loaded by the distilled rows through
``teacher.checkpoint``. Every run starts from scratch in a fresh ``--out`` (an existing
non-empty folder is refused). ``diagnostics`` reports each teacher's accuracy on the training
images clean and strongly augmented, which tells how far out of its distribution the student's
batch is. Prints one JSON object on stdout; writes ``--report`` (md) and ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from clsim.config import parse_config  # noqa: E402
from clsim.data.strong_augment import BatchMixup, StrongAugment  # noqa: E402
from clsim.experiment import run  # noqa: E402
from clsim.teacher import load_teacher, teacher_config  # noqa: E402
from evidence import fresh_out, mean_std  # noqa: E402  (benchmarks/evidence.py)

NO_TEACHER = {"distillation": "none"}
STUDENT_ROWS = {  # row -> (strategy keys over the config's deit_lt section, teacher, student model)
    "vit_ce_plain": ({**NO_TEACHER, "augment": False, "drw": False}, None, None),
    "vit_ce": ({**NO_TEACHER, "drw": False}, None, None),
    "vit_drw": ({**NO_TEACHER, "drw": True, "drw_cls": True}, None, None),
    "vit_la": ({"name": "deit_lt_teacher", "loss": "logit_adjust"}, None, None),
    "deit_lt": ({"distillation": "hard", "drw": True}, "teacher", None),
    "deit_lt_no_drw": ({"distillation": "hard", "drw": False}, "teacher", None),
    "deit_lt_id": ({"distillation": "hard", "drw": True}, "teacher_id", None),
    "deit_lt_id_no_drw": ({"distillation": "hard", "drw": False}, "teacher_id", None),
    "deit_lt_dhvt": ({"distillation": "hard", "drw": True}, "teacher", "dhvt_distilled"),
}
TEACHERS = ("teacher", "teacher_id")
ORDER = ("vit_ce_plain", "vit_ce", "vit_drw", "vit_la", "teacher", "teacher_id", "deit_lt", "deit_lt_no_drw",
         "deit_lt_id", "deit_lt_id_no_drw", "deit_lt_dhvt")
KEYS = ("average_accuracy", "head_accuracy", "medium_accuracy", "tail_accuracy")
RECIPE_KEYS = ("randaugment", "mixup", "cutmix", "label_smoothing", "erase_prob")  # shared by vit_la / teacher_id


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "scenarios" / "synthetic_lt.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default=None, help="an empty or new folder for the run folders (default: a temp dir)")
    parser.add_argument("--report", default=str(ROOT / "reports" / "deit_lt.md"), help="'' to skip")
    parser.add_argument("--json", default=str(ROOT / "reports" / "deit_lt.json"), help="'' to skip")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained in parallel processes (same numbers)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, few images: a smoke run")
    return parser.parse_args()


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    raw = yaml.safe_load(Path(args.config).read_text())
    if raw.get("strategy", {}).get("name") != "deit_lt" or "teacher" not in raw:
        print(f"error: --config: {args.config} must have strategy deit_lt and a teacher section", file=sys.stderr)
        raise SystemExit(2)
    if args.quick:
        raw["scenario"] |= {"max_train_per_class": 12, "max_test_per_class": 6}
        raw["train"] |= {"epochs": 2}
        raw["teacher"]["train"] |= {"epochs": 1}
    return raw


def recipe(raw: dict[str, Any]) -> dict[str, Any]:
    """The student's strong-augmentation keys, for the strategies that must use the same ones."""
    return {k: v for k, v in raw["strategy"].items() if k in RECIPE_KEYS}


def run_seeds(raw: dict[str, Any], args: argparse.Namespace, out: Path) -> list[dict[str, dict]]:
    """Every seed's rows, ``--jobs`` seeds at a time (each seed's runs depend only on the seed)."""
    if args.jobs <= 1:
        return [run_seed(raw, seed, out) for seed in args.seeds]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=torch.set_num_threads,
                             initargs=(args.threads,)) as pool:
        return list(pool.map(run_seed, [raw] * len(args.seeds), args.seeds, [out] * len(args.seeds)))


def run_seed(raw: dict[str, Any], seed: int, out: Path) -> dict[str, dict]:
    """Every row's metrics for one seed (the two teachers first)."""
    raw = copy.deepcopy(raw) | {"seed": seed}
    results, dirs = {}, {}
    for name in TEACHERS:
        dirs[name] = out / f"seed{seed}" / name
        results[name] = train_teacher(raw, name, dirs[name])
    for row, (keys, teacher, model) in STUDENT_ROWS.items():
        results[row] = run_row(row_config(raw, row, seed, keys, teacher and dirs[teacher], model),
                               out / f"seed{seed}" / row)
    return results


def row_config(raw: dict[str, Any], row: str, seed: int, keys: dict[str, Any], teacher_dir: Path | None,
               model: str | None) -> dict[str, Any]:
    cfg = copy.deepcopy(raw) | {"name": f"{row}_s{seed}"}
    if keys.get("name") == "deit_lt_teacher":
        cfg["strategy"] = {**keys, **recipe(raw)}
    else:
        cfg["strategy"] = {**cfg["strategy"], **keys}
    if teacher_dir is None:
        cfg.pop("teacher")
    else:
        cfg["teacher"] = {"checkpoint": str(teacher_dir)}
    if model is not None:
        cfg["model"] = {**cfg["model"], "name": model}
    return cfg


def train_teacher(raw: dict[str, Any], name: str, run_dir: Path) -> dict:
    cfg = copy.deepcopy(raw)
    if name == "teacher_id":  # the same CNN and loss, on the student's strong augmentations
        cfg["teacher"]["strategy"] = {"name": "deit_lt_teacher", "loss": "logit_adjust", **recipe(raw)}
    started = time.perf_counter()
    metrics = run(teacher_config(parse_config(cfg)), run_dir, quiet=True, keep_models=True)
    metrics["diagnostics"] = teacher_diagnostics(cfg, run_dir)
    print(f"{name} seed {raw['seed']}: {metrics['average_accuracy']:.3f} tail {metrics['tail_accuracy']:.3f} "
          f"({time.perf_counter() - started:.0f} s) {metrics['diagnostics']}", file=sys.stderr)
    return metrics


def teacher_diagnostics(cfg: dict[str, Any], run_dir: Path) -> dict[str, float]:
    """The trained teacher's accuracy on the training images: clean, after RandAugment + erasing,
    and after Mixup/CutMix too (against the larger mixed label): how OOD the student's batch is."""
    config = parse_config(cfg | {"teacher": {"checkpoint": str(run_dir)}})
    scenario = config.scenario.build(config.data.build(), config.seed)
    teacher = load_teacher(config, run_dir, scenario, torch.device("cpu")).for_experience(0)
    data = scenario.experiences[0].train
    x, y = map(torch.stack, zip(*[(img, torch.as_tensor(label)) for img, label in (data[i] for i in range(len(data)))]))
    s = {k: v for k, v in cfg["strategy"].items() if k in RECIPE_KEYS}
    generator_state = torch.get_rng_state()
    torch.manual_seed(config.seed)
    augmented = StrongAugment(**{k: s[k] for k in ("randaugment", "erase_prob") if k in s})(x)
    mix = BatchMixup(scenario.num_classes, **{k: s[k] for k in ("mixup", "cutmix", "label_smoothing") if k in s})
    mixed, soft = mix(augmented, y)
    torch.set_rng_state(generator_state)
    with torch.no_grad():
        acc = {name: float((teacher(images).argmax(1) == labels).float().mean())
               for name, images, labels in [("clean", x, y), ("augmented", augmented, y),
                                            ("mixed", mixed, soft.argmax(1))]}
    return acc


def run_row(cfg: dict[str, Any], run_dir: Path) -> dict:
    started = time.perf_counter()
    metrics = run(parse_config(cfg), run_dir, quiet=True)
    print(f"{cfg['name']}: {metrics['average_accuracy']:.3f} tail {metrics['tail_accuracy']:.3f} "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return metrics


def aggregate(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """Mean and std over seeds of each row's overall / head / medium / tail (and each head alone)."""
    table = {}
    for row in ORDER:
        stats = {key: mean_std([s[row][key] for s in per_seed]) for key in KEYS}
        for variant in per_seed[0][row].get("variants", {}):  # the CLS and DIST heads alone
            for key in ("average_accuracy", "tail_accuracy"):
                stats[f"{variant}_{key}"] = mean_std([s[row]["variants"][variant][key] for s in per_seed])
        for key in per_seed[0][row].get("diagnostics", {}):
            stats[f"teacher_on_{key}"] = mean_std([s[row]["diagnostics"][key] for s in per_seed])
        table[row] = stats
    return table


def checks(table: dict[str, dict]) -> dict[str, bool]:
    """The paper's claims, each as a comparison of seed means."""
    m = {row: {k: table[row][k]["mean"] for k in ("average_accuracy", "tail_accuracy")} for row in ORDER}
    baselines = ("vit_ce_plain", "vit_ce", "vit_drw", "vit_la")
    return {
        "plain_vit_tail_fails": m["vit_ce_plain"]["tail_accuracy"] < table["vit_ce_plain"]["head_accuracy"]["mean"] - 0.2,
        "deit_lt_tail_above_every_baseline": all(m["deit_lt"]["tail_accuracy"] > m[b]["tail_accuracy"] for b in baselines),
        "deit_lt_overall_above_every_baseline": all(m["deit_lt"]["average_accuracy"] > m[b]["average_accuracy"]
                                                    for b in baselines),
        "ood_teacher_above_in_distribution": m["deit_lt"]["average_accuracy"] > m["deit_lt_id"]["average_accuracy"],
        "drw_lifts_the_tail": m["deit_lt"]["tail_accuracy"] > m["deit_lt_no_drw"]["tail_accuracy"],
    }


def cpu_time() -> float:
    """CPU seconds of this process and of its finished children (the ``--jobs`` workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def fmt(stat: dict[str, float] | None) -> str:
    return "–" if stat is None else f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def write_report(path: Path, result: dict[str, Any], raw: dict[str, Any], command: str) -> None:
    table = result["rows"]
    lines = [
        "# DeiT-LT at CPU scale: distillation from a CNN teacher against plain-ViT long-tail baselines",
        "",
        f"Generated from scratch by `{command}` (config `{result['config']}`, seeds {result['seeds']}, "
        f"{result['wall_s'] / 60:.0f} min wall, {result['cpu_s'] / 60:.0f} min CPU on this machine, "
        f"{result['threads']} thread). Accuracy in % on the balanced test set, mean ± std over seeds; "
        f"the same data and seeds for every row. Rows: the docstring of `benchmarks/deit_lt.py`.",
        "",
        f"Training images per class (head -> tail): {result['train_counts']}; groups "
        f"{result['groups']}.",
        "",
        "| row | overall | head | medium | tail | CLS alone | DIST alone | DIST tail |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in ORDER:
        s = table[row]
        lines.append(f"| {row} | {fmt(s['average_accuracy'])} | {fmt(s['head_accuracy'])} | "
                     f"{fmt(s['medium_accuracy'])} | {fmt(s['tail_accuracy'])} | "
                     f"{fmt(s.get('cls_average_accuracy'))} | {fmt(s.get('dist_average_accuracy'))} | "
                     f"{fmt(s.get('dist_tail_accuracy'))} |")
    lines += ["", "Teachers on their training images (%): clean / strongly augmented / + Mixup-CutMix "
                  "(against the larger mixed label):", ""]
    for name in TEACHERS:
        s = table[name]
        lines.append(f"- `{name}`: {fmt(s['teacher_on_clean'])} / {fmt(s['teacher_on_augmented'])} / "
                     f"{fmt(s['teacher_on_mixed'])}")
    lines += ["", "The paper's direction, checked on the seed means:", ""]
    lines += [f"- {name.replace('_', ' ')}: **{'yes' if ok else 'no'}**" for name, ok in result["checks"].items()]
    lines += ["", f"Student `{raw['model']}`; teacher `{raw['teacher']['model']}` trained with "
              f"`{raw['teacher']['strategy']}` and `{raw['teacher']['train']}`; student training "
              f"`{raw['train']}`; strategy `{raw['strategy']}`. Why the claims that fail do: "
              f"benchmarks/README.md (`deit_lt.py`)."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds = args.seeds[:1]
    raw, out = base_config(args), fresh_out(args.out, "bench_deit_lt_")
    started, cpu_started = time.perf_counter(), cpu_time()
    per_seed = run_seeds(raw, args, out)
    table = aggregate(per_seed)
    config = parse_config(raw)
    scenario = config.scenario.build(config.data.build(), config.seed)
    cfg_path = Path(args.config).resolve()
    result = {
        "benchmark": "deit_lt", "seeds": args.seeds,
        "config": str(cfg_path.relative_to(ROOT) if cfg_path.is_relative_to(ROOT) else cfg_path),
        "quick": args.quick, "threads": args.threads,
        "train_counts": scenario.train_counts.tolist(), "groups": raw.get("metrics", {}),
        "rows": table, "checks": checks(table),
        "per_seed": {row: [{k: s[row][k] for k in KEYS} for s in per_seed] for row in ORDER},
        "wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(cpu_time() - cpu_started, 1),
    }
    command = "python benchmarks/deit_lt.py" + (" --quick" if args.quick else "")
    if args.report:
        write_report(Path(args.report), result, raw, command)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
