"""FedConv against the sub-model baselines and their public-data controls (issue 14, item 4).

Writes ``reports/fedconv.md`` and ``reports/fedconv.json`` (one object per row and setting) and
prints the JSON on stdout (progress on stderr). Every run is trained from scratch.

Every row runs ``scenarios/fed_fedconv.yaml`` (digits, all 10 classes in one experience, the
benchmark CNN, 10 clients on ``clients/edge_fleet.yaml``: edge servers r = 1, phones 0.75,
wearables 0.5625; 5 sampled per round, 15 rounds x 2 local epochs; 5 % of the training data
held by the server in every row, only the rows that learn on it use it) with only its
``federated.server`` section and the partition changed. Settings: IID, Dirichlet(0.5),
Dirichlet(0.1). Rows:

- ``fedavg``: the full model to every client. The reference, not a feasible baseline (a
  wearable cannot hold it); the stream is one where it reaches >= 90 % under IID.
- ``fedavg_smallest``: every client trains the smallest tier's width (the feasible floor).
- ``heterofl``, ``fedrolex``: the slicing baselines as their code runs them (Scaler, static BN,
  masked logits, per-label head aggregation).
- ``fedconv``: the scenario's FedConv (compression, dilation and aggregation learnt on the
  public set, 10 epochs per phase, each phase kept at its best epoch on a held-out 20 % of it).
- ``fedconv_ft``: the same plus the paper's fine-tuning (global model and each returned
  client model, 10 epochs each on the public set).
- ``fedconv_sbn``: an ablation, not the paper's: FedConv with HeteroFL's static BN (clients
  train on batch statistics, the global model's are measured on the participants' data, each
  narrower client measures its own before it is evaluated). A learnt compression mixes
  channels, so sliced statistics are not the compressed model's, nor folded ones the dilated
  global model's.
- ``heterofl_ft``, ``fedrolex_ft``: the controls, the slicing baselines with the same 10 epochs
  of global fine-tuning on the same public set, selected the same way: what the public data
  gives without FedConv's learning on the model.

Per row and setting, mean and std over seeds: global accuracy (the server's model on the test
set), mean client accuracy (each sampled client's own sub-model on its own test data) and per
tier, MB per round, client GFLOPs per round, server seconds per round. Nothing is selected on
the test set (the public code selects every server phase's epoch on it, so the paper's
numbers are test-selected).

    python benchmarks/fedconv.py --jobs 2               # ~15 min on 2 CPU cores
    python benchmarks/fedconv.py --seeds 0 --rounds 2 --settings iid --rows fedavg heterofl --report-dir /tmp/r
    python benchmarks/fedconv.py --settings iid --rows heterofl fedconv_mean=fedconv,aggregation=mean --report-dir /tmp/r
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from evidence import fresh_out, mean_std  # noqa: E402

SCENARIO = ROOT / "scenarios" / "fed_fedconv.yaml"
SETTINGS = {"iid": {"name": "iid"}, "dir0.5": {"name": "dirichlet", "alpha": 0.5},
            "dir0.1": {"name": "dirichlet", "alpha": 0.1}}
FINETUNE = 10  # epochs: the public code's server fine-tuning budget, the same in every row that has it
ROWS: dict[str, dict[str, Any] | None] = {
    "fedavg": {"name": "fedavg"},
    "fedavg_smallest": {"name": "fedavg_smallest"},
    "heterofl": {"name": "heterofl"},
    "fedrolex": {"name": "fedrolex"},
    "fedconv": None,  # the scenario's own server section
    "fedconv_ft": {"finetune": FINETUNE, "client_finetune": FINETUNE},  # merged into it
    "fedconv_sbn": {"static_bn": True},  # an ablation: HeteroFL's sBN on FedConv
    "heterofl_ft": {"name": "heterofl", "finetune": FINETUNE},
    "fedrolex_ft": {"name": "fedrolex", "finetune": FINETUNE},
}
METRICS = ("global_accuracy", "client_accuracy", "mb_per_round", "client_gflops_per_round", "server_s_per_round")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--rows", nargs="+", type=row_spec, default=list(ROWS.items()), metavar="ROW",
                        help=f"rows: {', '.join(ROWS)}, or LABEL=NAME,KEY=VALUE,... (a server section, values "
                             "read as YAML; NAME fedconv starts from the scenario's section)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: the scenario's)")
    parser.add_argument("--public-fraction", type=float, default=None,
                        help="federated.public_fraction in every row (default: the scenario's, 0.05)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes (same numbers)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--report-dir", type=Path, default=ROOT / "reports")
    parser.add_argument("--out", default=None, help="run folders (new or empty; default a temp dir)")
    return parser.parse_args()


def row_spec(row: str) -> tuple[str, dict[str, Any] | None]:
    """A ``--rows`` entry as (label, server spec): a named row, or LABEL=NAME,KEY=VALUE,..."""
    if row in ROWS:
        return row, ROWS[row]
    label, _, spec = row.partition("=")
    if not label or not spec:
        raise argparse.ArgumentTypeError(f"{row!r}: expected one of {', '.join(ROWS)} or LABEL=NAME,KEY=VALUE,...")
    name, *pairs = spec.split(",")
    try:
        options = {k: yaml.safe_load(v) for k, v in (pair.split("=", 1) for pair in pairs)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{row!r}: each option after the name is KEY=VALUE") from None
    return label, (options if name == "fedconv" else {"name": name} | options)


def server_section(base: dict[str, Any], spec: dict[str, Any] | None) -> dict[str, Any]:
    """A row's ``federated.server``: its own section, or (no ``name``) keys over the scenario's FedConv."""
    return dict(spec) if spec and "name" in spec else base["federated"]["server"] | (spec or {})


def run_config(base: dict[str, Any], row: tuple[str, dict[str, Any] | None], setting: str, seed: int,
               rounds: int | None = None, public_fraction: float | None = None) -> dict[str, Any]:
    """The scenario with this row's server section, this setting's partition and this seed."""
    label, spec = row
    raw = copy.deepcopy(base) | {"seed": seed, "name": f"fedconv_bench_{label}_{setting}_{seed}"}
    raw["federated"]["server"] = server_section(base, spec)
    raw["federated"]["partition"] = dict(SETTINGS[setting])
    if rounds is not None:
        raw["federated"]["rounds_per_experience"] = rounds
    if public_fraction is not None:
        raw["federated"]["public_fraction"] = public_fraction
    return raw


def run_one(raw: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One federation; the row's figures, and the mean client accuracy per tier."""
    from clsim.config import parse_config
    from clsim.experiment import run

    config = parse_config(copy.deepcopy(raw), base_dir=SCENARIO.parent)
    started = time.perf_counter()
    metrics = run(config, run_dir, quiet=True)
    rounds = len(metrics["rounds"])
    tiers = [t.name for t in config.federated.fleet.assign(config.federated.num_clients, config.seed)]
    by_tier: dict[str, list[float]] = {}
    for k, accuracy in metrics["client_accuracy"][-1].items():
        by_tier.setdefault(tiers[int(k)], []).append(accuracy)
    per_tier = {name: float(np.mean(values)) for name, values in sorted(by_tier.items())}
    return {"global_accuracy": metrics["average_accuracy"], "client_accuracy": metrics["mean_client_accuracy"][-1],
            "client_accuracy_per_tier": per_tier,
            "mb_per_round": metrics["communication_bytes"]["total"] / rounds / 1e6,
            "client_gflops_per_round": metrics["client_flops"] / rounds / 1e9,
            "server_s_per_round": metrics.get("server_time_s", 0.0) / rounds,
            "wall_s": time.perf_counter() - started}


def run_task(task: tuple[dict[str, Any], str]) -> dict[str, Any]:
    raw, run_dir = task
    result = run_one(raw, Path(run_dir))
    print(f"{raw['name']}: global {result['global_accuracy']:.3f} client {result['client_accuracy']:.3f} "
          f"({result['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    return result


def check_configs(base: dict[str, Any], args: argparse.Namespace) -> None:
    """Every row's config is read before any run trains (a row's runs differ only in seed and
    partition): a bad row is one line and exit 2."""
    from clsim.config import parse_config
    from clsim.errors import ConfigError

    for row in args.rows:
        raw = run_config(base, row, args.settings[0], args.seeds[0], args.rounds, args.public_fraction)
        try:
            parse_config(raw, base_dir=SCENARIO.parent)
        except ConfigError as exc:
            print(f"error: row {row[0]}: {exc}", file=sys.stderr)
            raise SystemExit(2) from None


def run_all(base: dict[str, Any], args: argparse.Namespace, out: Path) -> dict[tuple[str, str], list[dict]]:
    keys = [(setting, row, seed) for setting in args.settings for row in args.rows for seed in args.seeds]
    tasks = [(run_config(base, row, setting, seed, args.rounds, args.public_fraction),
              str(out / f"{setting}_{row[0]}_{seed}")) for setting, row, seed in keys]
    if args.jobs <= 1:
        results = [run_task(task) for task in tasks]
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(args.threads,)) as pool:
            results = list(pool.map(run_task, tasks))
    grouped: dict[tuple[str, str], list[dict]] = {}
    for (setting, (label, _), _), result in zip(keys, results):
        grouped.setdefault((setting, label), []).append(result)
    return grouped


def summarize(setting: str, row: tuple[str, dict[str, Any] | None], runs: list[dict[str, Any]],
              base: dict[str, Any]) -> dict[str, Any]:
    tiers = sorted({t for r in runs for t in r["client_accuracy_per_tier"]})
    return {"setting": setting, "row": row[0], "server": server_section(base, row[1]),
            **{m: mean_std([r[m] for r in runs]) for m in METRICS},
            "client_accuracy_per_tier": {t: mean_std([r["client_accuracy_per_tier"].get(t) for r in runs])
                                         for t in tiers},
            "seeds": len(runs), "runs": runs}


def checks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the paper claims and what makes the comparison mean anything, per setting."""
    get = {(r["setting"], r["row"]): r for r in rows}
    acc = lambda s, row, m="global_accuracy": get[s, row][m]["mean"] if (s, row) in get else None  # noqa: E731
    out: dict[str, Any] = {}
    if acc("iid", "fedavg") is not None:
        out["fedavg_iid_at_least_0.90"] = acc("iid", "fedavg") >= 0.90
    out["every_row_above_twice_chance"] = all(r["global_accuracy"]["mean"] > 0.2 for r in rows)
    for s in dict.fromkeys(r["setting"] for r in rows):
        slicing = [acc(s, b) for b in ("heterofl", "fedrolex") if acc(s, b) is not None]
        controls = [acc(s, b) for b in ("heterofl_ft", "fedrolex_ft") if acc(s, b) is not None]
        for row in ("fedconv", "fedconv_ft", "fedconv_sbn"):
            if acc(s, row) is None:
                continue
            if slicing:
                out[f"{s}: {row} global above heterofl and fedrolex"] = acc(s, row) > max(slicing)
                out[f"{s}: {row} client above heterofl and fedrolex"] = acc(s, row, "client_accuracy") > max(
                    acc(s, b, "client_accuracy") for b in ("heterofl", "fedrolex") if (s, b) in get)
            if controls:
                out[f"{s}: {row} global above the fine-tuned controls"] = acc(s, row) > max(controls)
        if acc(s, "fedconv") is not None and acc(s, "heterofl") is not None:
            a, b = (get[s, r]["client_gflops_per_round"]["mean"] for r in ("fedconv", "heterofl"))
            out[f"{s}: fedconv client GFLOPs within 5% of heterofl's"] = abs(a - b) <= 0.05 * b
    return out


def cell(stat: dict[str, float] | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if stat is None else f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def write_report(args: argparse.Namespace, rows: list[dict[str, Any]], found: dict[str, Any], seconds: float,
                 command: str) -> None:
    tiers = sorted({t for r in rows for t in r["client_accuracy_per_tier"]})
    lines = ["# FedConv vs sub-model baselines and their public-data controls (issue 14)", "",
             f"Produced from scratch by `{command}` in {seconds / 60:.1f} min on {torch.get_num_threads()}-thread "
             f"CPU runs ({args.jobs} at a time); seeds {args.seeds}, mean ± std.", "",
             "Setup: `scenarios/fed_fedconv.yaml` (its header says what it trains) with each row's "
             "`federated.server` and each setting's partition"
             + (f", public_fraction {args.public_fraction}" if args.public_fraction is not None else "")
             + f"; fine-tuning rows use {FINETUNE} epochs on the "
             "same public set, selected on the same held-out part. Nothing is selected on the test set; "
             "the public code's (and so the paper's) numbers are test-selected.", ""]
    for setting in args.settings:
        lines += [f"## {setting}", "",
                  "| row | global acc | mean client acc | " + " | ".join(f"{t} acc" for t in tiers)
                  + " | MB / round | client GFLOPs / round | server s / round |",
                  "|---" * (6 + len(tiers)) + "|"]
        for r in (r for r in rows if r["setting"] == setting):
            per_tier = " | ".join(cell(r["client_accuracy_per_tier"].get(t)) for t in tiers)
            lines.append(f"| {r['row']} | {cell(r['global_accuracy'])} | {cell(r['client_accuracy'])} | {per_tier} | "
                         f"{cell(r['mb_per_round'], digits=2)} | {cell(r['client_gflops_per_round'], digits=2)} | "
                         f"{cell(r['server_s_per_round'], digits=2)} |")
        lines.append("")
    lines += ["## Checks", ""] + [f"- {name}: **{'yes' if ok else 'no'}**" for name, ok in found.items()] + [""]
    args.report_dir.mkdir(parents=True, exist_ok=True)
    (args.report_dir / "fedconv.md").write_text("\n".join(lines))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    base = yaml.safe_load(SCENARIO.read_text())
    check_configs(base, args)
    out = fresh_out(args.out, "fedconv_bench_")
    command = "python benchmarks/fedconv.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    grouped = run_all(base, args, out)
    seconds = time.perf_counter() - started
    rows = [summarize(setting, row, grouped[setting, row[0]], base) for setting in args.settings for row in args.rows]
    found = checks(rows)
    result = {"command": command.strip(), "seconds": round(seconds, 1), "seeds": args.seeds, "rows": rows,
              "checks": found}
    write_report(args, rows, found, seconds, command.strip())
    (args.report_dir / "fedconv.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
