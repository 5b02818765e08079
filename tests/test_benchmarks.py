"""The benchmark scripts run end to end with their smallest options and print the JSON promised.

Each runs as a subprocess (as a user would run it) and takes tens of seconds, hence ``slow``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *options: str) -> dict:
    """Run ``benchmarks/<script>`` and return the one JSON object it prints on stdout."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *options],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_overhead_prints_throughputs_and_overheads():
    result = run_benchmark("overhead.py", "--epochs", "1", "--repeats", "1", "--cases", "digits_vit")
    assert result["benchmark"] == "overhead"
    assert {"settings", "target_overhead_pct", "target_metric", "max_overhead_pct", "meets_target",
            "cases"} <= set(result)
    case = result["cases"]["digits_vit"]
    assert {"images_per_s", "ms_per_step", "overhead_pct", "overhead_pct_paired", "overhead_pct_cpu_time",
            "train_wall_s", "train_cpu_s", "identical_weights", "ewc_fisher_s", "images_per_run",
            "steps_per_run"} <= set(case)
    assert set(case["images_per_s"]) == {"bare", "clsim", "clsim_progress", "clsim_ewc"}
    for key in ("overhead_pct", "overhead_pct_paired", "overhead_pct_cpu_time"):
        assert set(case[key]) == {"clsim", "clsim_progress", "clsim_ewc"}
    assert all(v > 0 for v in case["images_per_s"].values())
    assert case["identical_weights"] is True  # the bare loop did exactly clsim's work


@pytest.mark.slow
def test_vs_avalanche_prints_times_and_accuracies():
    pytest.importorskip("avalanche")
    result = run_benchmark("vs_avalanche.py", "--epochs", "1", "--repeats", "1")
    assert result["benchmark"] == "vs_avalanche"
    assert {"settings", "clsim", "avalanche", "speedup_avalanche_over_clsim", "speedup_paired_median",
            "speedup_cpu_time_paired_median", "accuracy_diff_points", "targets", "meets_speedup_target", "meets_accuracy_target",
            "shared_order"} <= set(result)
    for side in ("clsim", "avalanche"):
        assert {"wall_s_median", "wall_s", "cpu_s", "average_accuracy", "forgetting",
                "accuracy_matrix_first_run"} <= set(result[side])
        assert 0.0 <= result[side]["average_accuracy"] <= 1.0
    assert result["settings"]["clsim_lambda"] == 2 * result["settings"]["avalanche_ewc_lambda"]
    # on clsim's own batch order, Avalanche's EWC lands on the same accuracies
    assert abs(result["shared_order"]["accuracy_diff_points"]) <= 2.0


@pytest.mark.slow
def test_deit_lt_benchmark_quick_prints_every_row(tmp_path):
    result = run_benchmark("deit_lt.py", "--quick", "--out", str(tmp_path / "runs"),
                           "--report", str(tmp_path / "deit_lt.md"), "--json", str(tmp_path / "deit_lt.json"))
    assert result["benchmark"] == "deit_lt" and result["seeds"] == [0]
    assert set(result["rows"]) == {"vit_ce_plain", "vit_ce", "vit_drw", "vit_la", "teacher", "teacher_id",
                                   "deit_lt", "deit_lt_no_drw", "deit_lt_id", "deit_lt_id_no_drw", "deit_lt_dhvt"}
    assert "dist_tail_accuracy" in result["rows"]["deit_lt"]
    assert {"clean", "augmented", "mixed"} <= {k.removeprefix("teacher_on_") for k in result["rows"]["teacher"]}
    assert set(result["checks"]) == {"plain_vit_tail_fails", "deit_lt_tail_above_every_baseline",
                                     "deit_lt_overall_above_every_baseline", "ood_teacher_above_in_distribution",
                                     "drw_lifts_the_tail"}
    assert "| deit_lt_dhvt |" in (tmp_path / "deit_lt.md").read_text()
    assert json.loads((tmp_path / "deit_lt.json").read_text())["rows"] == result["rows"]


@pytest.mark.slow
def test_deit_lt_benchmark_refuses_a_used_out_folder(tmp_path):
    (tmp_path / "old_run").mkdir()  # a cached run would otherwise be reused
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "deit_lt.py"), "--quick", "--out", str(tmp_path),
                           "--report", "", "--json", ""], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--out" in proc.stderr and proc.stdout == ""


@pytest.mark.slow
def test_dhvt_benchmark_quick_prints_every_row(tmp_path):
    result = run_benchmark("dhvt.py", "--quick", "--out", str(tmp_path / "runs"),
                           "--report", str(tmp_path / "dhvt.md"), "--json", str(tmp_path / "dhvt.json"))
    assert result["benchmark"] == "dhvt" and result["seeds"] == [0]
    assert set(result["rows"]) == set(result["parameters"]) == {"vit", "dhvt", "resnet"}
    assert all(0.0 <= row["mean"] <= 1.0 for row in result["rows"].values())
    # comparable sizes: no model has more than 1.5x the parameters of another
    assert max(result["parameters"].values()) <= 1.5 * min(result["parameters"].values())
    assert set(result["checks"]) == {"vit_below_cnn", "dhvt_above_vit", "dhvt_closes_gap"}
    assert "| dhvt |" in (tmp_path / "dhvt.md").read_text()
    assert json.loads((tmp_path / "dhvt.json").read_text())["rows"] == result["rows"]


@pytest.mark.slow
def test_gpu_throughput_smoke_prints_every_key():
    result = run_benchmark("gpu_throughput.py", "--smoke")
    assert result["benchmark"] == "gpu_throughput" and result["smoke"] is True
    assert {"device", "device_name", "settings", "train", "eval", "engine_over_bare", "target_engine_over_bare",
            "meets_target", "input_pipeline", "input_pipeline_is_bottleneck"} <= set(result)
    train, evaluation, pipeline = result["train"], result["eval"], result["input_pipeline"]
    assert set(train["images_per_s"]) == set(train["ms_per_step"]) == set(train["peak_memory_mib"]) == {
        "bare", "engine", "engine_l2"}
    assert set(evaluation["images_per_s"]) == set(evaluation["peak_memory_mib"]) == {"bare", "engine"}
    assert all(v > 0 for v in [*train["images_per_s"].values(), *evaluation["images_per_s"].values()])
    assert set(result["engine_over_bare"]) == set(result["meets_target"]) == {"train", "eval"}
    # on CPU the bare loop did exactly the engine's work: same batches, same updates
    assert train["identical_weights"] is True and evaluation["accuracy"]["bare"] == evaluation["accuracy"]["engine"]
    assert result["settings"]["bf16_autocast"] is False  # CPU: autocast only on CUDA
    assert {"images", "image_size", "workers", "first_batch_s", "images_per_s", "images_per_s_with_start",
            "ms_per_image_one_process", "ms_per_image_by_stage", "workers_to_keep_up"} <= set(pipeline)
    assert pipeline["images"] > 0 and pipeline["images_per_s"] > 0
    # the stages are clsim's own ImageNet-R train transforms, after the decode
    assert list(pipeline["ms_per_image_by_stage"]) == ["decode", "RandomResizedCrop", "RandomHorizontalFlip",
                                                       "ToTensor", "Normalize"]


@pytest.mark.slow
def test_rehearsal_free_benchmark_tiny_writes_every_row_and_check(tmp_path):
    weights, report, rows_json = tmp_path / "w.safetensors", tmp_path / "rf.md", tmp_path / "rf.json"
    result = run_benchmark("rehearsal_free.py", "--tiny", "--weights", str(weights),
                           "--report", str(report), "--json", str(rows_json))
    assert result["benchmark"] == "rehearsal_free" and json.loads(rows_json.read_text()) == result
    assert list(result["rows"]) == ["finetune", "linear_probe", "l2_all", "l2_attention", "ewc_attention",
                                    "l2p", "dualprompt", "coda_prompt", "joint"]
    for name, row in result["rows"].items():
        for key in ("average_accuracy", "average_incremental_accuracy", "forgetting", "plasticity"):
            assert {"mean", "std", "per_seed"} <= set(row[key]), (name, key)
            assert len(row[key]["per_seed"]) == len(result["settings"]["seeds"])
        assert "lr" in row["setting"] and ("lambda" in row["setting"]) == (name in ("l2_all", "l2_attention",
                                                                                     "ewc_attention"))
        assert result["tuning"][name] and all("validation_accuracy" in t for t in result["tuning"][name])
    assert result["rows"]["joint"]["forgetting"]["mean"] is None  # one task: nothing to forget
    assert {"joint_clearly_above_finetune", "linear_probe_clearly_below_joint", "l2_attention_at_least_prompting",
            "above_ewc_and_finetune", "stream_can_differ", "paper_direction_holds"} <= set(result["checks"])
    assert weights.stat().st_size > 0 and "| l2_attention |" in report.read_text()


@pytest.mark.slow
def test_fedconv_benchmark_writes_every_row_setting_and_check(tmp_path):
    result = run_benchmark("fedconv.py", "--seeds", "0", "--rounds", "1", "--settings", "iid", "dir0.1",
                           "--rows", "fedavg", "heterofl", "fedconv", "heterofl_ft", "--report-dir", str(tmp_path))
    assert json.loads((tmp_path / "fedconv.json").read_text()) == result
    assert [(r["setting"], r["row"]) for r in result["rows"]] == [
        (s, row) for s in ("iid", "dir0.1") for row in ("fedavg", "heterofl", "fedconv", "heterofl_ft")]
    for row in result["rows"]:
        assert row["seeds"] == 1 and len(row["runs"]) == 1
        for key in ("global_accuracy", "client_accuracy", "mb_per_round", "client_gflops_per_round",
                    "server_s_per_round"):
            assert {"mean", "std"} == set(row[key]), (row["row"], key)
        assert set(row["client_accuracy_per_tier"]) <= {"phone", "wearable", "edge_server"}
    servers = {r["row"]: r["server"] for r in result["rows"]}
    assert servers["heterofl_ft"] == {"name": "heterofl", "finetune": 10} and servers["fedconv"]["name"] == "fedconv"
    by = {(r["setting"], r["row"]): r for r in result["rows"]}
    # the controls learn on the public set on the server; plain HeteroFL does not
    assert by["iid", "heterofl_ft"]["server_s_per_round"]["mean"] > by["iid", "heterofl"]["server_s_per_round"]["mean"]
    # sub-models: fewer client FLOPs than the full model to everyone
    assert by["iid", "heterofl"]["client_gflops_per_round"]["mean"] < by["iid", "fedavg"]["client_gflops_per_round"]["mean"]
    assert "fedavg_iid_at_least_0.90" in result["checks"]
    assert "## dir0.1" in (tmp_path / "fedconv.md").read_text()


@pytest.mark.slow
def test_fedconv_benchmark_refuses_a_used_out_folder(tmp_path):
    (tmp_path / "old").mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fedconv.py"), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not empty" in proc.stderr


@pytest.mark.slow
def test_fedconv_benchmark_refuses_a_bad_row_before_training(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fedconv.py"), "--rows", "bad=heterofl,nope=1",
                           "--report-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "federated.server.nope" in proc.stderr and not list(tmp_path.iterdir())
