"""Run folder writing, atomic writes, reading back, and comparison of runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from clsim.errors import ConfigError
from clsim.metrics import summarize
from clsim.report import compare_runs, read_run, write_results
from clsim.report import plots, run_folder
from clsim.report.compare import run_labels
from clsim import atomic
from clsim.report.run_folder import atomic_write_json, matrix_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
R3 = [[0.6, None, None], [0.8, 0.9, None], [0.5, 0.4, 0.7]]
FILES = ("metrics.json", "accuracy_matrix.csv", "curves.png", "accuracy_matrix.png", "report.md")


def fake_config(strategy: str = "ewc", **kwargs) -> dict:
    return {
        "name": "fake", "seed": 7,
        "data": {"name": "synthetic", "num_classes": 6},
        "scenario": {"name": "class_incremental", "n_experiences": 3},
        "model": {"name": "tiny_cnn"},
        "strategy": {"name": strategy, **kwargs},
        "train": {"epochs": 2, "batch_size": 16},
        "metrics": {"many_shot": 100, "few_shot": 20},
    }


def fake_metrics(R=R3, **extra) -> dict:
    return summarize(R) | {"wall_time_s": 12.34} | extra


def fake_experiences(T: int = 3) -> list[dict]:
    return [{"index": i, "classes": [f"class_{2 * i}", f"class_{2 * i + 1}"]} for i in range(T)]


def make_run(run_dir: Path, *, R=R3, strategy: str = "ewc", **extra) -> Path:
    """A finished run folder, as ``clsim run`` leaves it (config.yaml is the lead's part)."""
    config = fake_config(strategy, lambda_=100)
    write_results(run_dir, config=config, metrics=fake_metrics(R, **extra),
                  experiences=fake_experiences(len(R)), title=run_dir.name)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "ewc_run", custom_metric=3)


# ---------------------------------------------------------------- write_results

def test_write_results_creates_every_file(run_dir):
    for name in FILES:
        assert (run_dir / name).stat().st_size > 0, name
    for name in ("curves.png", "accuracy_matrix.png"):
        assert (run_dir / name).read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_metrics_json_round_trips(run_dir):
    assert json.loads((run_dir / "metrics.json").read_text()) == fake_metrics(custom_metric=3)


def test_report_md_content(run_dir):
    text = (run_dir / "report.md").read_text()
    assert text.startswith("# ewc_run\n")
    assert "`ewc (lambda_=100)`" in text and "`synthetic (num_classes=6)`" in text
    assert "| average accuracy (%) | 53.33 |" in text  # (0.5 + 0.4 + 0.7) / 3
    assert "| forward transfer (FWT) (%) | - |" in text
    assert "| wall time (s) | 12.3 |" in text
    assert "| custom_metric | 3 |" in text  # extra keys are reported too
    assert "| exp 0 | 60.00 | - | - |" in text
    assert "![accuracy over the stream](curves.png)" in text
    assert "![accuracy matrix](accuracy_matrix.png)" in text
    assert "- experience 2 (2 classes): class_4, class_5" in text


def test_accuracy_matrix_csv_exact(tmp_path):
    R = [[0.9, None], [0.75, 0.5]]
    assert matrix_csv(R) == "after_experience,exp_0,exp_1\n0,0.9,\n1,0.75,0.5\n"
    write_results(tmp_path, config=fake_config(), metrics=fake_metrics(R),
                  experiences=fake_experiences(2), title="two")
    assert (tmp_path / "accuracy_matrix.csv").read_text() == matrix_csv(R)


def test_json_full_precision_nan_and_numpy(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"third": 1 / 3, "nan": math.nan, "inf": -math.inf,
                             "np": np.float32(0.25), "arr": np.array([0.5, np.nan]),
                             "t": (1, None)})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"third": 1 / 3, "nan": None, "inf": None, "np": 0.25,
                                "arr": [0.5, None], "t": [1, None]}


# ---------------------------------------------------------------- atomic writes

def _fail(*args, **kwargs):
    raise OSError("simulated crash")


@pytest.mark.parametrize("where", ["os.replace", "os.fsync", "serialise"])
def test_crash_during_atomic_write_keeps_previous_file(tmp_path, monkeypatch, where):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"average_accuracy": 0.5})
    before = path.read_bytes()
    new = {"average_accuracy": 0.9}
    if where == "serialise":
        new["bad"] = object()  # not JSON-serialisable: fails before any file is opened
    else:
        monkeypatch.setattr(atomic.os, where.split(".")[1], _fail)
    with pytest.raises((OSError, TypeError)):
        atomic_write_json(path, new)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp files left


def test_crash_while_writing_results_leaves_no_metrics_json(tmp_path, monkeypatch):
    # metrics.json is written last, so an interrupted run is never taken for a finished one.
    monkeypatch.setattr(plots, "curves_png", _fail)
    with pytest.raises(OSError):
        write_results(tmp_path, config=fake_config(), metrics=fake_metrics(),
                      experiences=fake_experiences(), title="crash")
    assert not (tmp_path / "metrics.json").exists()
    with pytest.raises(ConfigError):
        read_run(tmp_path)


# ---------------------------------------------------------------- read_run

def test_read_run(run_dir):
    run = read_run(run_dir)
    assert run["name"] == "ewc_run" and run["path"] == run_dir
    assert run["metrics"]["average_accuracy"] == pytest.approx(1.6 / 3)
    assert run["config"]["strategy"] == {"name": "ewc", "lambda_": 100}


def test_read_run_on_empty_folder_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no metrics.json") as info:
        read_run(tmp_path)
    assert info.value.path == str(tmp_path)


def test_read_run_on_missing_folder_or_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="no such run folder"):
        read_run(tmp_path / "nope")
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_run(tmp_path)


# ---------------------------------------------------------------- compare

def test_compare_runs(tmp_path, run_dir):
    other = make_run(tmp_path / "finetune_run", R=[[0.9, None], [0.3, 0.95]],
                     strategy="finetune")
    out = tmp_path / "cmp"
    table = compare_runs([run_dir, other], out)
    lines = table.splitlines()
    assert len(lines) == 4  # header, separator, two runs
    assert lines[2].startswith("| ewc_run | ewc (lambda_=100) | tiny_cnn | 53.33 | 66.11 | 40.00 |")
    # finetune: avg acc (0.3 + 0.95) / 2 = 62.50; avg inc ((0.9) + 62.5%) / 2 = 76.25;
    # forgetting 0.9 - 0.3 = 60.00; BWT -60.00
    assert "| finetune_run | finetune (lambda_=100) | tiny_cnn | 62.50 | 76.25 | 60.00 | -60.00 |" \
        in table
    assert "head" not in table  # no run has head/medium/tail accuracy
    md = (out / "comparison.md").read_text()
    assert table in md and "![average accuracy over seen experiences](comparison.png)" in md
    png = (out / "comparison.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5_000


def test_compare_shows_groups_when_any_run_has_them(tmp_path, run_dir):
    lt = make_run(tmp_path / "lt", head_accuracy=0.9, medium_accuracy=0.5, tail_accuracy=0.125)
    table = compare_runs([run_dir, lt], tmp_path / "cmp")
    assert "head (%)" in table and "| 90.00 | 50.00 | 12.50 |" in table
    assert "| - | - | - |" in table  # ewc_run has none


def test_same_folder_names_are_disambiguated(tmp_path):
    a, b = make_run(tmp_path / "a" / "run"), make_run(tmp_path / "b" / "run")
    table = compare_runs([a, b], tmp_path / "cmp")
    assert "| a/run |" in table and "| b/run |" in table
    assert run_labels([Path("x/p/run"), Path("y/p/run"), Path("z/q")]) == \
        ["x/p/run", "y/p/run", "q"]


def test_compare_rejects_unfinished_folder(tmp_path, run_dir):
    with pytest.raises(ConfigError, match="no metrics.json"):
        compare_runs([run_dir, tmp_path], tmp_path / "cmp")


def test_plots_handle_edge_shapes():
    # One experience, and a long stream with the upper triangle measured.
    assert plots.curves_png([[0.5]])[:8] == PNG_MAGIC
    T = 40
    R = [[(i + j) % 10 / 10 for j in range(T)] for i in range(T)]
    assert plots.matrix_png(R)[:8] == PNG_MAGIC
    assert plots.curves_png(R)[:8] == PNG_MAGIC
