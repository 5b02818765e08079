"""Federated runs through Flower's own engines: the simulation engine (Ray) and the deployment
engine (a SuperLink and SuperNodes on loopback ports). Slow (Ray and process start-up): marked
``slow``, run in CI and skipped with ``-m 'not slow'``.
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("flwr")

from clsim.cli import main  # noqa: E402
from clsim.federated.loopback import BIN, Processes, flwr_env, free_port, wait_for_port  # noqa: E402
from test_federated import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RAW = tiny(clients_per_round=2, partition={"name": "dirichlet", "alpha": 0.5},
           server={"name": "fedprox", "mu": 0.01}) | {"name": "fed_flower", "seed": 2}
RAW["scenario"]["n_tasks"] = 3
RAW["federated"].pop("backend")  # Flower's simulation engine, the default
pytestmark = pytest.mark.slow


def write(tmp_path: Path, raw: dict, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def stable(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = [{k: v for k, v in r.items() if k != "wall_time_s"} for r in metrics["rounds"]]
    return {k: v for k, v in metrics.items() if k not in ("wall_time_s", "rounds")} | {"rounds": rounds}


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clsim.cli", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)


def test_simulation_engine_matches_inprocess_and_resumes_after_a_kill(tmp_path):
    config = write(tmp_path, RAW, "sim")
    # 1. Killed mid-run (after the first round boundary checkpoint), then resumed: on Ray.
    killed = tmp_path / "killed"
    proc = cli("run", str(config), "--out", str(killed), "--quiet")
    checkpoint, deadline = killed / "checkpoints" / "last.pt", time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if checkpoint.exists():
            state = __import__("torch").load(checkpoint, weights_only=False)["federated"]
            if state["experience"] * 2 + state["round"] >= 2:
                break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not (killed / "metrics.json").exists(), "killed too late or too early"
    resumed = cli("run", str(config), "--out", str(killed), "--quiet", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    # 2. Uninterrupted, on Ray.
    assert main(["run", str(config), "--out", str(tmp_path / "straight"), "--quiet"]) == 0
    # 3. Uninterrupted, in-process: the same numbers (replies are aggregated in client order).
    assert main(["run", str(config), "--out", str(tmp_path / "inproc"), "--quiet",
                 "--set", "federated.backend=inprocess"]) == 0
    straight = stable(tmp_path / "straight")
    assert stable(killed) == straight
    assert stable(tmp_path / "inproc") == straight


def test_a_hanging_client_times_out_and_the_run_goes_on(tmp_path):
    raw = copy.deepcopy(RAW)
    raw["scenario"]["n_tasks"] = 2
    raw["federated"] |= {"clients_per_round": 3, "rounds_per_experience": 1, "round_timeout_s": 6.0,
                         "fleet": {"name": "hangs", "tiers": [
                             {"name": "hangs", "share": 0.34, "hang_prob": 1.0, "hang_s": 10.0},
                             {"name": "fine", "share": 0.66}]}}
    out = tmp_path / "hang"
    assert main(["run", str(write(tmp_path, raw, "hang")), "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # The hanging client times out in every round. A hung client also keeps its Ray worker busy
    # for hang_s, so on 2 workers a later round may lose the others too: only the first is exact.
    hung = set.intersection(*(set(r["timed_out"]) for r in metrics["rounds"]))
    assert len(hung) == 1
    assert sorted(metrics["rounds"][0]["aggregated"] + metrics["rounds"][0]["timed_out"]) == [0, 1, 2]
    assert metrics["failed_clients"] >= 2 and len(metrics["accuracy_matrix"]) == 2


def test_the_same_apps_run_on_a_real_superlink_with_two_supernodes(tmp_path):
    """README, "Run on a real Flower federation", step by step on loopback ports. One experience:
    every message still runs in a fresh ``flwr-clientapp`` process (state from disk between
    training and consolidation); tests/test_federated_deploy.py runs two on real SuperNodes."""
    raw = copy.deepcopy(RAW)
    raw["scenario"]["n_tasks"] = 1
    raw["federated"] |= {"num_clients": 2, "rounds_per_experience": 1}
    del raw["federated"]["clients_per_round"]
    config, out = write(tmp_path, raw, "real"), tmp_path / "real_run"
    link = free_port()
    env = flwr_env(tmp_path / "flwr_home", "clsim", link)
    assert subprocess.run([sys.executable, "-m", "clsim.federated.server_app", str(tmp_path / "app")],
                          cwd=ROOT, env=env).returncode == 0
    procs = Processes(tmp_path, env)
    try:
        procs.start("superlink", str(BIN / "flower-superlink"), "--insecure", "--database", ":flwr-in-memory:",
                    "--port", str(link))
        wait_for_port(link)
        for k in range(2):
            procs.start(f"node{k}", str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                        "--port", str(free_port()), "--node-config", f"partition-id={k} num-partitions=2")
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(tmp_path / "app"), "clsim", "--stream",
             "--run-config", f"config='{config}' out='{out}'"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
        assert (out / "metrics.json").exists(), run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        procs.stop()
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["accuracy_matrix"]) == 1 and len(metrics["rounds"]) == 1
    assert all(sorted(r["aggregated"]) == [0, 1] for r in metrics["rounds"])
    assert metrics["communication_bytes"]["total"] > 0
    for name in ("config.yaml", "curves.png", "report.md", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    assert shutil.which("flwr", path=str(BIN))


def test_the_federated_benchmark_prints_json():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "federated.py"), "--parts", "round_time",
                             "--per-round", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)["round_time"]
    assert rows[0]["clients_per_round"] == 2 and rows[0]["s_per_round_median"] > 0
