"""``clsim run | validate | list | report | sweep``: argument parsing and exit codes only.

Exit codes: 0 done; 2 the input is wrong (one line on stderr naming the key or file);
1 anything else (a bug or an environment failure, with its traceback); for ``sweep``, 1 also
when some points failed (a summary on stderr, no traceback; the other points are done).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from clsim.errors import ConfigError

KINDS = ("datasets", "scenarios", "models", "strategies", "partitioners", "server_strategies")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every input error
        self.exit(2, f"clsim: error: {message} (see clsim {self.prog.split()[-1]} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clsim", description="Continual and federated learning simulation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run an experiment file into a run folder")
    _config_args(run)
    run.add_argument("--out", type=Path, help="run folder (default: runs/<name>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--keep-models", action="store_true",
                     help="also keep the model after every experience, so the run can be a teacher "
                          "(teacher: {checkpoint: RUN_DIR})")
    run.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    validate = sub.add_parser("validate", help="check an experiment file without running it")
    _config_args(validate)
    lst = sub.add_parser("list", help="list registered datasets, scenarios, models, strategies")
    lst.add_argument("kind", nargs="?", choices=KINDS, help="only this kind")
    report = sub.add_parser("report", help="compare finished runs side by side (mean ± std over seeds)")
    report.add_argument("runs", nargs="+", type=Path, metavar="RUN_OR_SWEEP_DIR",
                        help="run folders, or folders holding them (a sweep's output)")
    report.add_argument("--out", type=Path, default=None,
                        help="where comparison.md, the figures and index.html go "
                             "(default: SWEEP_DIR/report for one sweep folder, else runs/comparison)")
    sweep = sub.add_parser("sweep", help="run a grid of experiments x seeds, each into a run folder")
    sweep.add_argument("sweep", type=Path, metavar="SWEEP.yaml", help="sweep file (see clsim/sweep.py)")
    sweep.add_argument("--out", type=Path, help="sweep folder (default: the file's out, else runs/<name>)")
    sweep.add_argument("--jobs", type=int, default=None,
                       help="points at a time (default: half the cores; each gets cores/jobs torch threads)")
    sweep.add_argument("--backend", choices=("local", "ray"), default="local",
                       help="local processes (default) or Ray tasks")
    sweep.add_argument("--ray-address", default=None,
                       help="Ray cluster to join, e.g. auto or ray://head:10001 (default: start a local Ray)")
    sweep.add_argument("--dry-run", action="store_true", help="validate and list the points; run nothing")
    return parser


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="experiment YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="shrink to a smoke run: 1 epoch, a few images per class")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"clsim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clsim: interrupted (a run continues with --resume)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (`clsim list | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit flush
        return 0


def _load(args: argparse.Namespace):
    from clsim import load_config, smoke

    config = load_config(args.config, args.overrides)
    return smoke(config) if args.smoke else config


def cmd_run(args: argparse.Namespace) -> int:
    from clsim.experiment import run

    config = _load(args)
    run(config, args.out or Path("runs") / config.name, resume=args.resume, quiet=args.quiet,
        keep_models=args.keep_models)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    config = _load(args)
    data = config.data.name if config.data is not None else "its own data"
    print(f"{args.config}: ok ({data}, {config.scenario.name}, "
          f"{config.model.name}, {config.strategy.name})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from clsim.registry import DATASETS, MODELS, PARTITIONERS, SCENARIOS, SERVER_STRATEGIES, STRATEGIES

    registries = dict(zip(KINDS, (DATASETS, SCENARIOS, MODELS, STRATEGIES, PARTITIONERS, SERVER_STRATEGIES)))
    for kind, registry in registries.items():
        if args.kind and kind != args.kind:
            continue
        print(f"{kind}:")
        width = max(map(len, registry.names()))
        for name in registry.names():
            print(f"  {name:<{width}}  {registry.summary(name)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from clsim.report.compare import compare_runs, find_runs

    runs = find_runs(args.runs)
    out = args.out or default_report_dir(args.runs)
    table = compare_runs(runs, out)
    print(table)
    print(f"\nwritten: {out / 'comparison.md'}, {out / 'index.html'} (figures next to them)")
    return 0


def default_report_dir(paths: list[Path]) -> Path:
    """``SWEEP_DIR/report`` for one folder that is not itself a run, else ``runs/comparison``."""
    from clsim.report.run_folder import METRICS

    if len(paths) == 1 and not (paths[0] / METRICS).exists():
        return paths[0] / "report"
    return Path("runs") / "comparison"


def cmd_sweep(args: argparse.Namespace) -> int:
    from clsim.sweep import assign_threads, default_jobs, load_sweep, run_sweep

    if args.jobs is not None and args.jobs < 1:
        raise ConfigError("--jobs", f"expected an int >= 1, got {args.jobs}")
    sweep = load_sweep(args.sweep, args.out)
    if args.dry_run:
        assign_threads(sweep, args.jobs or default_jobs())
        for point in sweep.points:
            print(point.record()["command"])
        print(f"{len(sweep.points)} points -> {sweep.out}")
        return 0
    points = run_sweep(sweep, jobs=args.jobs, backend=args.backend, ray_address=args.ray_address,
                       echo=lambda line: print(line, flush=True))
    failed = [p for p in points if p.status == "failed"]
    if failed:  # exit 1, a summary and no traceback: the other points are done
        print(f"clsim: {len(failed)} of {len(points)} points failed (logs in {sweep.out / 'logs'}):",
              file=sys.stderr)
        for point in failed:
            print(f"  {point.id}: {point.error}", file=sys.stderr)
        return 1
    print(f"all {len(points)} points done: clsim report {sweep.out}")
    return 0


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "list": cmd_list, "report": cmd_report,
            "sweep": cmd_sweep}

if __name__ == "__main__":
    sys.exit(main())
