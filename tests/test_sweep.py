"""``clsim sweep``: expanding a grid x seeds into points, validating it up front, running points
as ordinary run folders (skipping finished ones, resuming half-finished ones), and a failing
point that does not stop the others."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from clsim.cli import main
from clsim.config import load_config
from clsim.sweep import (Tracker, _override, assign_threads, classify, load_sweep, run_sweep,
                         sweep_lock, threads_per_job, value_labels)

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny", "seed": 0,
    "data": {"name": "digits"},
    "scenario": {"name": "class_incremental", "n_tasks": 2, "max_train_per_class": 12,
                 "max_test_per_class": 6},
    "model": {"name": "mlp", "hidden": [16]},
    "strategy": {"name": "ewc", "lambda": 10.0},
    "train": {"epochs": 1, "batch_size": 16},
}
# A strategy that passes validation but fails while running: the sweep must carry on.
BOOM = '''
from clsim.strategies.base import Finetune

class Boom(Finetune):
    def before_task(self, model, task):
        raise RuntimeError("boom in before_task")
'''


def write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def sweep_file(tmp_path: Path, **spec) -> Path:
    base = write(tmp_path / "tiny.yaml", TINY)
    return write(tmp_path / "sweep.yaml", {"base": str(base), "out": str(tmp_path / "out")} | spec)


# ---------------------------------------------------------------- expansion and validation

def test_grid_times_seeds_expands_in_order(tmp_path):
    other = write(tmp_path / "other.yaml", TINY | {"name": "other"})
    path = sweep_file(tmp_path, grid={"strategy": [{"name": "finetune"}, {"name": "ewc", "lambda": 5.0}],
                                      "train.lr": [0.01, 0.001]},
                      seeds=2, set={"train.batch_size": 8})
    raw = yaml.safe_load(path.read_text())
    write(path, raw | {"base": [raw["base"], str(other)]})
    sweep = load_sweep(path)
    assert len(sweep.points) == 2 * 2 * 2 * 2
    first = sweep.points[0]
    assert first.id == "tiny/finetune,lr=0.01/seed0"
    assert first.overrides == ["train.batch_size=8", "strategy={name: finetune}", "train.lr=0.01", "seed=0"]
    assert first.out == tmp_path / "out" / "tiny" / "finetune,lr=0.01" / "seed0"
    assert sweep.points[-1].id == "other/ewc,lr=0.001/seed1"
    assert len({p.out for p in sweep.points}) == len(sweep.points)


def test_no_seeds_key_keeps_each_base_seed_and_no_grid_is_one_point(tmp_path):
    write(tmp_path / "tiny.yaml", TINY | {"seed": 7})
    sweep = load_sweep(write(tmp_path / "s.yaml", {"base": str(tmp_path / "tiny.yaml")}))
    assert [(p.id, p.seed, p.overrides) for p in sweep.points] == [("seed7", 7, [])]
    assert sweep.out == Path("runs") / "s"


@pytest.mark.parametrize("value", ["finetune", "1.0", 1e-5, 0.001, None, True, [32, 64],
                                   {"name": "ewc", "lambda": 1e3, "params": ["blocks.*", "head"]}])
def test_override_text_parses_back_equal(value):
    key, text = _override("a.b", value).split("=", 1)
    assert key == "a.b" and yaml.safe_load(text) == value


def test_value_labels_add_arguments_only_where_names_clash():
    assert value_labels("strategy", [{"name": "ewc", "lambda": 1}, {"name": "ewc", "lambda": 10},
                                     {"name": "lwf"}]) == ["ewc,lambda=1", "ewc,lambda=10", "lwf"]
    assert value_labels("strategy.name", ["finetune", "l2"]) == ["finetune", "l2"]
    assert value_labels("model.channels", [[8, 16], [8, 16]]) == ["channels=_8,_16__1", "channels=_8,_16__2"]


def test_value_labels_keep_the_avalanche_plugin():
    values = [{"name": "avalanche", "plugin": "EWCPlugin", "ewc_lambda": 1.0},
              {"name": "avalanche", "plugin": "avalanche.training.plugins:LwFPlugin"},
              {"plugin": "my/boom.py:Boom"}]
    assert value_labels("strategy", values) == ["avalanche-EWCPlugin", "avalanche-LwFPlugin", "Boom"]


@pytest.mark.parametrize("spec, message", [
    ({"grid": {"train.epochz": [1, 2]}}, "(point epochz=1/seed0): train.epochz: unknown key"),
    ({"grid": {"strategy.name": ["finetune", "ewc"]}}, "(point finetune/seed0): strategy.lambda: unknown key"),
    ({"grid": {"strategy.lambda": [-1.0]}}, "strategy.lambda"),
    ({"grid": {"train.lr": 0.1}}, "grid.train.lr: expected a non-empty list"),
    ({"grid": {"seed": [1, 2]}}, "grid.seed: give seeds with the top-level 'seeds' key"),
    ({"seeds": 0}, "seeds: expected a count >= 1"),
    ({"seeds": [1, 1]}, "seeds: expected a count >= 1 or a list of distinct ints"),
    ({"gird": {}}, "gird: unknown key (did you mean 'grid'?)"),
    ({"base": "missing.yaml"}, "base: experiment file not found: missing.yaml"),
    ({"out": 3}, "out: expected a folder path, got 3"),
    ({"set": {"seed": 3}}, "set.seed: give seeds with the top-level 'seeds' key"),
    ({"grid": {"train.lr": [0.1, 0.10]}}, "grid.train.lr: the value 0.1 is listed twice"),
    ({"grid": {"strategy": [{"name": "ewc", "lambda": 1.0}, {"lambda": 1.0, "name": "ewc"}]}},
     "grid.strategy: the value {'name': 'ewc', 'lambda': 1.0} is listed twice"),
])
def test_bad_sweep_file_is_one_line_and_exit_2_before_anything_runs(tmp_path, capsys, spec, message):
    path = sweep_file(tmp_path, **spec)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clsim: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # validated up front: nothing ran, nothing written


def test_dry_run_prints_each_point_as_a_clsim_run_command(tmp_path, capsys):
    path = sweep_file(tmp_path, grid={"strategy": [{"name": "finetune"}]}, seeds=[3])
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"clsim run {tmp_path / 'tiny.yaml'} --set 'strategy={{name: finetune}}' --set seed=3 " \
           f"--out {tmp_path / 'out' / 'finetune' / 'seed3'} --quiet" in out
    assert not (tmp_path / "out").exists()


def test_dry_run_commands_carry_the_thread_count_of_their_jobs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("clsim.sweep.usable_cores", lambda: 8)
    path = sweep_file(tmp_path, seeds=1)
    assert main(["sweep", str(path), "--dry-run", "--jobs", "2"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("OMP_NUM_THREADS=4 MKL_NUM_THREADS=4 OPENBLAS_NUM_THREADS=4 clsim run ")


def test_a_started_point_keeps_its_thread_count_under_other_jobs(tmp_path, monkeypatch):
    monkeypatch.setattr("clsim.sweep.usable_cores", lambda: 8)
    sweep = load_sweep(sweep_file(tmp_path, seeds=2))
    assign_threads(sweep, 4)
    assert [p.threads for p in sweep.points] == [2, 2]
    sweep.points[0].out.mkdir(parents=True)  # seed0 started (say, a checkpoint), seed1 did not
    Tracker(sweep, echo=lambda line: None).save()
    again = load_sweep(sweep.path)
    assign_threads(again, 1)
    assert [p.threads for p in again.points] == [2, 8]
    assert again.points[0].record()["command"].startswith("OMP_NUM_THREADS=2 ")


def test_out_that_is_a_file_or_cannot_be_created_is_one_line_exit_2(tmp_path, capsys):
    path = sweep_file(tmp_path)
    (tmp_path / "file").write_text("")
    assert main(["sweep", str(path), "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert err == f"clsim: error: --out: {tmp_path / 'file'} is not a folder\n"
    write(path, yaml.safe_load(path.read_text()) | {"out": str(tmp_path / "file" / "sub")})
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clsim: error: {path}: out: cannot create ") and err.count("\n") == 1


def test_a_point_that_cannot_write_its_log_fails_alone(tmp_path, capsys):
    path = sweep_file(tmp_path, seeds=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "logs").write_text("a file where the logs folder goes")
    assert main(["sweep", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "seed0: cannot start the point: " in err
    record = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [p["status"] for p in record["points"]] == ["failed"]


def test_same_config_ignores_the_report_section(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, seeds=1))
    point = sweep.points[0]
    point.out.mkdir(parents=True)
    saved = load_config(point.base, point.overrides).to_dict()
    saved["report"] = {"tensorboard": True}
    (point.out / "config.yaml").write_text(yaml.safe_dump(saved))
    (point.out / "metrics.json").write_text("{}")
    assert classify(point) == "done"


def test_a_second_sweep_into_the_same_folder_is_refused(tmp_path, capsys):
    path = sweep_file(tmp_path, grid={"strategy": [{"name": "finetune"}]})
    with sweep_lock(tmp_path / "out"):
        assert main(["sweep", str(path)]) == 2
    assert "out: another clsim sweep is running into this folder" in capsys.readouterr().err
    assert not (tmp_path / "out" / "finetune").exists()


# ---------------------------------------------------------------- running
# Slow: each point is a new Python process that imports torch (5 of them, ~15 s on 2 idle cores).

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Fine-tuning and a strategy that fails at run time, 2 seeds each, run to the end."""
    tmp = tmp_path_factory.mktemp("sweep")
    (tmp / "boom.py").write_text(BOOM)
    path = sweep_file(tmp, seeds=2, grid={"strategy": [{"name": "finetune"},
                                                        {"plugin": f"{tmp / 'boom.py'}:Boom"}]})
    proc = subprocess.run([sys.executable, "-m", "clsim.cli", "sweep", str(path), "--jobs", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    return tmp, path, proc


@pytest.mark.slow
def test_a_failing_point_does_not_stop_the_sweep(finished):
    tmp, _, proc = finished
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("clsim: 2 of 4 points failed")
    assert "  Boom/seed0: RuntimeError: boom in before_task" in proc.stderr
    for seed in (0, 1):
        assert (tmp / "out" / "finetune" / f"seed{seed}" / "metrics.json").is_file()
    assert "Traceback" in (tmp / "out" / "logs" / "Boom__seed0.log").read_text()
    assert "[2/4 done, 0 running, 2 failed]" in proc.stdout


@pytest.mark.slow
def test_sweep_json_records_every_point(finished):
    tmp, _, _ = finished
    record = json.loads((tmp / "out" / "sweep.json").read_text())
    status = {p["id"]: p["status"] for p in record["points"]}
    assert status == {"finetune/seed0": "done", "finetune/seed1": "done",
                      "Boom/seed0": "failed", "Boom/seed1": "failed"}
    assert record["spec"]["seeds"] == 2


@pytest.mark.slow
def test_report_of_the_sweep_folder_groups_the_seeds(finished, capsys):
    tmp, _, _ = finished
    assert main(["report", str(tmp / "out")]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("| finetune (mask_past=False) |"))
    assert row.endswith(" | 2 |") and " ± " in row  # two seeds: mean ± std; Boom never finished
    assert (tmp / "out" / "report" / "index.html").is_file()


@pytest.mark.slow
def test_a_point_is_exactly_its_clsim_run_command(finished, tmp_path):
    tmp, _, _ = finished
    point = tmp / "out" / "finetune" / "seed1"
    assert yaml.safe_load((point / "config.yaml").read_text())["seed"] == 1
    record = json.loads((tmp / "out" / "sweep.json").read_text())
    command = next(p["command"] for p in record["points"] if p["id"] == "finetune/seed1")
    words = shlex.split(command)
    env = dict(w.split("=", 1) for w in words[:words.index("clsim")])  # OMP_NUM_THREADS=N ...
    assert env["OMP_NUM_THREADS"] == str(threads_per_job(2))
    args = words[words.index("clsim") + 1:]
    args[args.index("--out") + 1] = str(tmp_path / "direct")
    subprocess.run([sys.executable, "-m", "clsim.cli", *args], env=os.environ | env, check=True, cwd=ROOT)
    ours = json.loads((point / "metrics.json").read_text())
    direct = json.loads((tmp_path / "direct" / "metrics.json").read_text())
    assert ours["accuracy_matrix"] == direct["accuracy_matrix"]
    assert ours["train_loss"] == direct["train_loss"]


@pytest.mark.slow
def test_rerun_runs_only_what_is_missing_and_resumes_half_done_points(finished):
    tmp, path, _ = finished
    done = tmp / "out" / "finetune" / "seed0"
    before = json.loads((done / "metrics.json").read_text())
    (done / "metrics.json").unlink()  # killed after its last checkpoint: must resume, not restart
    sweep = load_sweep(path)
    sweep.points = [p for p in sweep.points if "Boom" not in p.id]
    lines = []
    points = run_sweep(sweep, jobs=2, echo=lines.append)
    assert {p.id: p.status for p in points} == {"finetune/seed0": "done", "finetune/seed1": "skipped"}
    assert lines[0].endswith(" 1 already done, 1 to run (local, 2 at a time) -> " + str(tmp / "out"))
    after = json.loads((done / "metrics.json").read_text())
    assert after["accuracy_matrix"] == before["accuracy_matrix"]
    # Resumed after its last experience: nothing retrained, so the stored wall time is unchanged
    # (a restart from scratch would measure a new one).
    assert after["wall_time_s"] == before["wall_time_s"]


@pytest.mark.slow
def test_a_finished_point_of_another_config_is_never_overwritten(finished, tmp_path):
    tmp, path, _ = finished
    raw = yaml.safe_load(path.read_text())
    stale = write(tmp_path / "stale.yaml", raw | {"grid": {"strategy": [{"name": "finetune"}]},
                                                  "set": {"train.lr": 0.5}})
    metrics = (tmp / "out" / "finetune" / "seed0" / "metrics.json").read_text()
    points = run_sweep(load_sweep(stale), jobs=1, echo=lambda line: None)
    assert {p.status for p in points} == {"failed"}
    assert "holds a finished run of another config" in points[0].error
    assert (tmp / "out" / "finetune" / "seed0" / "metrics.json").read_text() == metrics


@pytest.mark.slow
def test_ray_backend_runs_points_on_a_local_ray(tmp_path):
    pytest.importorskip("ray")
    path = sweep_file(tmp_path, seeds=2, grid={"strategy": [{"name": "finetune"}]})
    proc = subprocess.run([sys.executable, "-m", "clsim.cli", "sweep", str(path), "--backend", "ray",
                           "--jobs", "2"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for seed in (0, 1):
        assert (tmp_path / "out" / "finetune" / f"seed{seed}" / "metrics.json").is_file()
    assert f"(ray, num_cpus={threads_per_job(2)} per point)" in proc.stdout
    assert "[2/2 done, 0 running, 0 failed]" in proc.stdout


# A strategy that sleeps once its point runs, after writing its process id where the test sees it.
SLEEPY = """
import os, time
from pathlib import Path
from clsim.strategies.base import Finetune

class Sleepy(Finetune):
    def before_task(self, model, task):
        Path(os.environ["SLEEPY_DIR"], str(os.getpid())).write_text("")
        time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its exit status is left


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_sweep_stops_its_points_and_records_them_interrupted(tmp_path, sig):
    (tmp_path / "sleepy.py").write_text(SLEEPY)
    (tmp_path / "pids").mkdir()
    path = sweep_file(tmp_path, seeds=2, grid={"strategy": [{"plugin": f"{tmp_path / 'sleepy.py'}:Sleepy"}]})
    sweep = subprocess.Popen([sys.executable, "-m", "clsim.cli", "sweep", str(path), "--jobs", "2"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=os.environ | {"SLEEPY_DIR": str(tmp_path / "pids")})
    try:
        deadline = time.monotonic() + 120
        while len(list((tmp_path / "pids").iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = [int(f.name) for f in (tmp_path / "pids").iterdir()]
        assert len(pids) == 2 and all(map(_alive, pids))
        sweep.send_signal(sig)
        _, err = sweep.communicate(timeout=60)  # not the points' 300 s: they were stopped
    finally:
        sweep.kill()
    assert sweep.returncode == 130 and "Traceback" not in err
    time.sleep(0.5)
    assert not any(map(_alive, pids))
    record = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [p["status"] for p in record["points"]] == ["interrupted", "interrupted"]


def test_an_unreachable_ray_address_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    ray = pytest.importorskip("ray")
    path = sweep_file(tmp_path, seeds=1)
    started = time.monotonic()
    assert main(["sweep", str(path), "--backend", "ray", "--ray-address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clsim: error: --ray-address: cannot reach 127.0.0.1:1: ") and err.count("\n") == 1
    assert time.monotonic() - started < 30
    # Ray's own failure to connect (an address the check leaves to Ray) is one line too.
    monkeypatch.setattr(ray, "init", lambda **kwargs: (_ for _ in ()).throw(ConnectionError("no GCS\nat all")))
    assert main(["sweep", str(path), "--backend", "ray", "--ray-address", "auto"]) == 2
    assert capsys.readouterr().err == "clsim: error: --ray-address: cannot connect to Ray at auto: no GCS\n"
