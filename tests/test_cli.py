"""The CLI: commands, exit codes, one-line errors, and the run folder it leaves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clsim.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny", "seed": 3,
    "data": {"name": "digits"},
    "scenario": {"name": "class_incremental", "n_tasks": 3, "max_train_per_class": 30},
    "model": {"name": "mlp", "hidden": [32]},
    "strategy": {"name": "ewc", "lambda": 100.0, "mask_past": True},
    "train": {"epochs": 2, "batch_size": 16},
}
RUN_FILES = ["config.yaml", "metrics.json", "accuracy_matrix.csv", "curves.png",
             "accuracy_matrix.png", "report.md", "checkpoints/last.pt"]


def write_config(tmp_path: Path, raw: dict = TINY, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clsim.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_run_writes_the_whole_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(write_config(tmp_path)), "--out", str(out), "--quiet"]) == 0
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    R = metrics["accuracy_matrix"]
    assert len(R) == 3 and R[0][1] is None and all(0 <= v <= 1 for v in R[2])
    assert metrics["average_accuracy"] == pytest.approx(sum(R[2]) / 3)
    for key in ("average_incremental_accuracy", "forgetting", "bwt", "fwt", "wall_time_s"):
        assert key in metrics
    assert yaml.safe_load((out / "config.yaml").read_text())["strategy"]["lambda"] == 100.0
    assert capsys.readouterr().err == ""  # --quiet


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    config = write_config(tmp_path)
    results = []
    for name in ("a", "b"):
        assert main(["run", str(config), "--out", str(tmp_path / name), "--quiet"]) == 0
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        results.append((metrics["accuracy_matrix"], metrics["train_loss"]))
    assert results[0] == results[1]
    assert main(["run", str(config), "--out", str(tmp_path / "c"), "--quiet", "--set", "seed=4"]) == 0
    other = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert other["train_loss"] != results[0][1]


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    config, out = write_config(tmp_path), tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    before = (out / "metrics.json").read_bytes()
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == before


def test_out_that_is_a_file_is_an_input_error(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    assert main(["run", str(write_config(tmp_path)), "--out", str(target), "--quiet"]) == 2
    assert "names a file" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_resume_refuses_a_different_config(tmp_path, capsys):
    config, out = write_config(tmp_path), tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    code = main(["run", str(config), "--out", str(out), "--resume", "--quiet", "--set", "train.lr=0.5"])
    assert code == 2 and "train.lr" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path):
    raw = TINY | {"train": {"epochs": 30, "batch_size": 8},
                  "scenario": {"name": "class_incremental", "n_tasks": 4}}
    config, out = write_config(tmp_path, raw), tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "clsim.cli", "run", str(config), "--out", str(out), "--quiet"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = out / "checkpoints" / "last.pt"
    deadline = __import__("time").monotonic() + 240
    while not checkpoint.exists() and proc.poll() is None and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.05)
    proc.kill()
    proc.wait()
    assert checkpoint.exists() and not (out / "metrics.json").exists(), "killed too late or too early"
    resumed = run_cli("run", str(config), "--out", str(out), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert main(["run", str(config), "--out", str(tmp_path / "straight"), "--quiet"]) == 0
    a = json.loads((out / "metrics.json").read_text())
    b = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["train_loss"] == b["train_loss"]


@pytest.mark.parametrize("args, path", [
    (["--set", "strategy.lamda=1"], "strategy.lamda"),
    (["--set", "train.lr=-1"], "train.lr"),
    (["--set", "scenario.n_tasks=11"], "scenario.n_tasks"),
    (["--set", "data.name=cifar10"], "data.root"),  # missing data set
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, path):
    monkeypatch.setenv("CLSIM_DATA", str(tmp_path / "no-data"))
    assert main(["run", str(write_config(tmp_path)), "--out", str(tmp_path / "o"), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"clsim: error: {path}:"), lines


def test_a_real_process_prints_no_traceback_on_bad_input(tmp_path):
    result = run_cli("run", str(write_config(tmp_path)), "--set", "strategy.lamda=1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "clsim: error: strategy.lamda: unknown key (did you mean 'lambda'?); "
        "known: decay, first_task_anchor, fisher, l2, lambda, mask_past, mode, params"]


def test_missing_config_file_and_bad_arguments(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["run"])
    assert info.value.code == 2


def test_list_into_a_closed_pipe_is_not_an_error():
    proc = subprocess.Popen([sys.executable, "-m", "clsim.cli", "list"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # like `clsim list | head -1`
    assert proc.wait(timeout=120) == 0
    assert b"Traceback" not in proc.stderr.read()


def test_validate_and_list(tmp_path, capsys):
    assert main(["validate", str(write_config(tmp_path))]) == 0
    assert "ok (digits, class_incremental, mlp, ewc)" in capsys.readouterr().out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for line in ("datasets:", "strategies:", "  ewc ", "  digits ", "  vit "):
        assert line in out
    assert "Elastic Weight Consolidation" in out
    assert main(["list", "models"]) == 0
    assert "strategies:" not in capsys.readouterr().out


def test_report_compares_runs(tmp_path, capsys):
    config = write_config(tmp_path)
    for name, strategy in (("ewc_run", "ewc"), ("ft_run", "finetune")):
        assert main(["run", str(config), "--out", str(tmp_path / name), "--quiet",
                     "--set", f"strategy={{name: {strategy}}}"]) == 0
    out = tmp_path / "cmp"
    assert main(["report", str(tmp_path / "ewc_run"), str(tmp_path / "ft_run"), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "ewc_run" in table and "ft_run" in table
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(tmp_path / "nothing")]) == 2


def shipped_scenarios(*, embedded: bool) -> list[str]:
    """Shipped scenario files whose data is embedded (digits, synthetic), or that need a download."""
    names = sorted(p.name for p in (ROOT / "scenarios").glob("*.yaml"))
    return [n for n in names if (yaml.safe_load((ROOT / "scenarios" / n).read_text())["data"]["name"]
                                 in ("digits", "synthetic")) == embedded]


RUNNABLE = shipped_scenarios(embedded=True)


@pytest.mark.parametrize("name", RUNNABLE)
def test_shipped_scenario_runs_end_to_end_in_smoke_mode(tmp_path, name):
    out = tmp_path / name
    assert main(["run", str(ROOT / "scenarios" / name), "--smoke", "--quiet", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["accuracy_matrix"]) == len(metrics["accuracy_matrix"][0])


def test_every_shipped_scenario_is_either_smoke_tested_or_needs_absent_data():
    assert {"quickstart.yaml", "synthetic_lt.yaml"} <= set(RUNNABLE)
    assert {"imagenet_r.yaml", "cifar10_lt.yaml", "cifar100_lt.yaml"} <= set(shipped_scenarios(embedded=False))


@pytest.mark.parametrize("name", shipped_scenarios(embedded=False))
def test_large_scenarios_fail_with_the_missing_data_message(tmp_path, name, capsys, monkeypatch):
    monkeypatch.setenv("CLSIM_DATA", str(tmp_path / "no-data"))
    assert main(["run", str(ROOT / "scenarios" / name), "--quiet", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clsim: error: data.root:") and str(tmp_path / "no-data") in err
    assert not (tmp_path / "o").exists()
