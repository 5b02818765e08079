"""``clsim run | validate | list | report``: argument parsing and exit codes only.

Exit codes: 0 done; 2 the input is wrong (one line on stderr naming the key or file);
1 anything else (a bug or an environment failure, with its traceback).
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
    report = sub.add_parser("report", help="compare finished runs side by side")
    report.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    report.add_argument("--out", type=Path, default=Path("runs") / "comparison",
                        help="where comparison.md and comparison.png go (default: runs/comparison)")
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
    print(f"{args.config}: ok ({config.data.name}, {config.scenario.name}, "
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
    from clsim.report.compare import compare_runs

    for run_dir in args.runs:
        if not (run_dir / "metrics.json").is_file():
            raise ConfigError(str(run_dir), "not a finished clsim run folder (no metrics.json)")
    table = compare_runs(list(args.runs), args.out)
    print(table)
    print(f"\nwritten: {args.out / 'comparison.md'}, {args.out / 'comparison.png'}")
    return 0


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "list": cmd_list, "report": cmd_report}

if __name__ == "__main__":
    sys.exit(main())
