"""Seconds per round on Flower's deployment engine (a SuperLink and SuperNodes on loopback) against
the same federation in-process: the README's "Run on a real Flower federation" recipe, timed.

Prints one JSON object on stdout (progress on stderr). Engines (``--engines``):

- ``inprocess``: ``clsim run CONFIG --set federated.backend=inprocess`` (one process, no Flower
  transport): the round time of the compute alone.
- ``warm``: the recipe as the README gives it now: every SuperNode in process isolation
  (``--isolation process``) with one long-lived ``python -m clsim.federated.worker`` per node,
  which keeps torch, clsim and the stream loaded between messages; the ServerApp polls the
  SuperLink for replies every ``poll-s`` seconds.
- ``cold``: the earlier recipe: Flower's default isolation, one fresh ``flwr-clientapp``
  process per message, and Flower's own reply polling (3 s, as ``poll-s=3``).

For each: ``s_per_round_mean`` / ``_median`` (the rounds' ``wall_time_s`` in metrics.json:
the server's push, the clients' work, the replies, aggregation, evaluation, checkpoint),
``federation_s`` (the whole federation incl. discovery and consolidation, metrics'
``wall_time_s``), ``federation_s_per_round`` (that / rounds) and ``end_to_end_s`` (the command).

    python benchmarks/federated_deploy.py                             # inprocess + warm, ~5 min
    python benchmarks/federated_deploy.py --engines inprocess,warm,cold       # + ~13 min

Measured on 2 shared CPU cores (load 4-14): 0.93 / 6.69 / 31.2 s per round (docs/federated.md,
"On Flower's deployment engine"). The ~3 s a SuperNode idles between a reply and its next
message is Flower's (``flwr/supernode/start_client_internal.py``), not the transport's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clsim.federated.loopback import BIN, Processes, flwr_env, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("inprocess", "warm", "cold")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def federation(work: Path, clients: int, warm: bool) -> Iterator[tuple[str, dict[str, str]]]:
    """A SuperLink and ``clients`` SuperNodes on loopback (``warm``: with one worker each);
    yields (the FLWR_HOME federation name, the environment for ``flwr run``)."""
    link = free_port()
    env = flwr_env(work / "flwr_home", "bench", link)
    procs = Processes(work, env)
    try:
        procs.start("superlink", str(BIN / "flower-superlink"), "--insecure", "--database", ":flwr-in-memory:",
                    "--port", str(link))
        wait_for_port(link)
        for k in range(clients):
            port = free_port()
            isolation = ["--isolation", "process"] if warm else []
            procs.start(f"supernode{k}", str(BIN / "flower-supernode"), "--insecure", "--superlink",
                        f"127.0.0.1:{link}", "--port", str(port), *isolation,
                        "--node-config", f"partition-id={k} num-partitions={clients}")
            if warm:
                wait_for_port(port)
                procs.start(f"worker{k}", sys.executable, "-m", "clsim.federated.worker",
                            "--runtime-api-address", f"127.0.0.1:{port}", "--insecure")
        yield "bench", env
    finally:
        procs.stop()


def summary(out: Path, end_to_end: float) -> dict[str, Any]:
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = [r["wall_time_s"] for r in metrics["rounds"]]
    return {"rounds": len(rounds), "s_per_round_mean": round(statistics.fmean(rounds), 3),
            "s_per_round_median": round(statistics.median(rounds), 3),
            "s_per_round_max": round(max(rounds), 3),
            "federation_s": round(metrics["wall_time_s"], 2),
            "federation_s_per_round": round(metrics["wall_time_s"] / len(rounds), 3),
            "end_to_end_s": round(end_to_end, 2), "average_accuracy": metrics.get("average_accuracy")}


def run_inprocess(config: Path, sets: list[str], work: Path) -> dict[str, Any]:
    out = work / "inprocess"
    args = [sys.executable, "-m", "clsim.cli", "run", str(config), "--out", str(out), "--quiet",
            "--set", "federated.backend=inprocess", *(a for s in sets for a in ("--set", s))]
    started = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True, timeout=1200)
    return summary(out, time.perf_counter() - started)


def run_deployed(config: Path, sets: list[str], work: Path, clients: int, name: str,
                 timeout_s: float) -> dict[str, Any]:
    warm = name.startswith("warm")
    work, out = work / name, work / name / "run"
    work.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "clsim.federated.server_app", str(work / "app")], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)
    run_config = f"config='{config}' out='{out}' set='{';'.join(sets)}'"
    if not warm:  # Flower's own reply polling, as before the PollingGrid
        run_config += " poll-s=3.0"
    with federation(work, clients, warm) as (fed, env):
        started = time.perf_counter()
        done = subprocess.run([str(BIN / "flwr"), "run", str(work / "app"), fed, "--stream",
                               "--run-config", run_config], cwd=work, env=env, capture_output=True,
                              text=True, timeout=timeout_s)
        took = time.perf_counter() - started
    if not (out / "metrics.json").exists():
        raise RuntimeError(f"{name}: no metrics.json; flwr run said:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return summary(out, took) | {"logs": str(work)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "scenarios" / "fed_digits.yaml"))
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--engines", default="inprocess,warm", help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides (key=value)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per deployment run")
    parser.add_argument("--work", default=None, help="keep run folders and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    if unknown := set(engines) - set(ENGINES):
        parser.error(f"--engines: unknown {sorted(unknown)}; expected some of {', '.join(ENGINES)}")
    config = Path(args.config).resolve()
    sets = [f"federated.num_clients={args.clients}", f"federated.clients_per_round={args.clients}", *args.set]
    result: dict[str, Any] = {"config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
                              "clients": args.clients, "set": sets}
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        for engine in engines:
            log(f"{engine} ...")
            if engine == "inprocess":
                result[engine] = run_inprocess(config, sets, work)
            else:
                result[engine] = run_deployed(config, sets, work, args.clients, engine, args.timeout_s)
            log(f"{engine}: {json.dumps(result[engine])}")
    if "inprocess" in result:
        base = result["inprocess"]["s_per_round_mean"]
        result["above_inprocess_s_per_round"] = {e: round(result[e]["s_per_round_mean"] - base, 3)
                                                 for e in engines if e != "inprocess"}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
