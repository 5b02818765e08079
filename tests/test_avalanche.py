"""Avalanche interop: Avalanche training plugins as clsim strategies (through the CLI, resumed,
federated), Avalanche's EWCPlugin against clsim's ``ewc``, and scenarios <-> benchmarks."""

from __future__ import annotations

import copy
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("avalanche")

from clsim.cli import main  # noqa: E402
from clsim.config import parse_config  # noqa: E402
from clsim.errors import ConfigError  # noqa: E402
from clsim.scenarios.avalanche import from_avalanche, to_avalanche  # noqa: E402
from clsim.strategies.avalanche import REFUSED, SUPPORTED  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

BASE = {
    "name": "av", "seed": 0,
    "data": {"name": "digits", "shift": 0},  # no augmentation: both sides of a comparison see the same items
    "scenario": {"name": "class_incremental", "n_tasks": 3, "max_train_per_class": 40, "max_test_per_class": 20},
    "model": {"name": "mlp", "hidden": [32]},
    "strategy": {"name": "finetune"},
    "train": {"epochs": 3, "batch_size": 16, "lr": 0.01},
}
# train_mb_size = train.batch_size: the plugins' own passes (Fisher, importances, memories)
# use the same batches as an Avalanche strategy with train_mb_size 16 would.
PLUGINS = {
    "SynapticIntelligencePlugin": {"si_lambda": 100.0},
    "MASPlugin": {"lambda_reg": 10.0},
    "EWCPlugin": {"ewc_lambda": 50.0},
    "LwFPlugin": {"alpha": 1.0, "temperature": 2.0},
    "ReplayPlugin": {"mem_size": 60},
    "GEMPlugin": {"patterns_per_experience": 20, "memory_strength": 0.5},
}


def config(strategy: dict, **changes) -> dict:
    raw = copy.deepcopy(BASE) | {"strategy": strategy}
    for key, value in changes.items():
        raw[key] = value
    if raw["scenario"]["name"] == "avalanche":  # the benchmark brings its own data
        del raw["data"]
    return raw


def avalanche_strategy(plugin: str, **kwargs) -> dict:
    return {"name": "avalanche", "plugin": plugin, "train_mb_size": 16} | PLUGINS[plugin] | kwargs


def run(tmp_path: Path, raw: dict, name: str, *extra: str) -> dict:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--out", str(tmp_path / name), "--quiet", *extra]) == 0
    return json.loads((tmp_path / name / "metrics.json").read_text())


@pytest.fixture(scope="module")
def finetune(tmp_path_factory) -> dict:
    return run(tmp_path_factory.mktemp("finetune"), config({"name": "finetune"}), "finetune")


# ------------------------------------------------------------------- plugins through the CLI


@pytest.mark.parametrize("plugin", ["SynapticIntelligencePlugin", "MASPlugin", "EWCPlugin", "LwFPlugin"])
def test_penalty_plugins_change_training_from_the_second_experience(plugin, tmp_path, finetune):
    """Run through ``clsim run``: experience 0 trains exactly like fine-tuning (no penalty yet);
    from experience 1 on the plugin's term is in the loss, so the losses differ."""
    metrics = run(tmp_path, config(avalanche_strategy(plugin)), "run")
    assert metrics["train_loss"][0] == finetune["train_loss"][0]
    assert metrics["train_loss"][1] != finetune["train_loss"][1]
    assert metrics["train_loss"][1] > finetune["train_loss"][1]  # a penalty / distillation term was added
    assert f"- **strategy**: `avalanche {plugin} (" in (tmp_path / "run" / "report.md").read_text()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["strategy"]
    assert saved["name"] == "avalanche" and saved["plugin"] == plugin
    assert parse_config(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())).strategy.kwargs == \
        parse_config(config(avalanche_strategy(plugin))).strategy.kwargs


@pytest.mark.parametrize("plugin", ["ReplayPlugin", "GEMPlugin"])
def test_memory_plugins_cut_forgetting(plugin, tmp_path, finetune):
    """Replay and GEM keep old classes: fine-tuning forgets almost everything (~0.95 here),
    they keep most of it."""
    metrics = run(tmp_path, config(avalanche_strategy(plugin)), "run")
    assert finetune["forgetting"] > 0.8
    assert metrics["forgetting"] < finetune["forgetting"] - 0.5
    assert metrics["average_accuracy"] > finetune["average_accuracy"] + 0.3


def test_replay_with_mask_past_learns_the_new_experiences(tmp_path):
    """``mask_past`` masks earlier classes on the new data's rows only: the memory rows are
    earlier classes, and masking them too made their cross-entropy infinite (no learning)."""
    raw = config(avalanche_strategy("ReplayPlugin", mask_past=True), scenario=BASE["scenario"] | {"n_tasks": 2})
    metrics = run(tmp_path, raw, "masked")
    assert all(loss is not None and np.isfinite(loss) for loss in metrics["train_loss"])
    # masked: 0.0 (no step learnt anything); fixed: 0.2 here (the memory rows' full softmax
    # still favours the old classes), above 0.1, a guess among the 10 classes
    assert metrics["accuracy_matrix"][1][1] > 0.1
    assert metrics["accuracy_matrix"][1][0] > 0.8  # and the replayed classes are kept


def test_avalanche_ewc_plugin_matches_clsim_ewc(tmp_path):
    """Avalanche's EWCPlugin and clsim's ``ewc`` on the same stream, model, seed and batches.

    Both estimate the diagonal empirical Fisher the same way (squared gradients of the mean
    cross-entropy, averaged over the experience's training mini-batches in order, model in
    eval mode) and keep one (anchor, Fisher) pair per experience. Avalanche's penalty is
    ``ewc_lambda * sum F (theta - theta*)^2``, clsim's ``lambda / 2 * sum ...``, so clsim runs with
    ``lambda = 2 * ewc_lambda``. With one anchor (experience 1) the two runs are identical. With
    two, clsim folds the quadratics into one, ``W (theta - m)^2 + c``: the same gradient, with m
    exact where the anchors agree (an old class's head row under ``mask_past``), so the
    accuracy matrices stay identical and the losses agree to float rounding of the penalty's
    value. (Before m was computed around the newest anchor, its rounding gave ~1e-5 gradients
    where Avalanche's are exactly 0, which Adam turned into full-size steps: see anchored.py.)
    """
    ewc_lambda = 500.0
    ours = run(tmp_path, config({"name": "ewc", "lambda": 2 * ewc_lambda, "mode": "separate", "mask_past": True,
                                    "fisher": "batch_mean"}), "clsim")
    theirs = run(tmp_path, config(avalanche_strategy("EWCPlugin", ewc_lambda=ewc_lambda, mask_past=True)), "avalanche")
    masked_finetune = run(tmp_path, config({"name": "finetune", "mask_past": True}), "finetune")

    assert theirs["train_loss"][:2] == ours["train_loss"][:2]
    assert theirs["accuracy_matrix"] == ours["accuracy_matrix"]
    assert theirs["train_loss"] == pytest.approx(ours["train_loss"], rel=1e-6)
    # and the penalty is doing something: more loss, less forgetting than without it
    for metrics in (ours, theirs):
        assert metrics["train_loss"][1] > masked_finetune["train_loss"][1]
        assert metrics["forgetting"] < masked_finetune["forgetting"]


@pytest.mark.parametrize("plugin", ["ReplayPlugin", "SynapticIntelligencePlugin"])
def test_resume_is_exact(plugin, tmp_path, stop_before_experience):
    """Stopped after experience 1 and resumed: the plugin's state (replay buffer, SI's path
    integral and anchor) and Avalanche's clock come back, so the numbers are those of an
    uninterrupted run."""
    from conftest import Stopped

    raw = config(avalanche_strategy(plugin))
    full = run(tmp_path, raw, "full")
    undo = stop_before_experience(2)
    with pytest.raises(Stopped):
        run(tmp_path, raw, "cut")
    undo()
    resumed = run(tmp_path, raw, "cut", "--resume")
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["train_loss"] == full["train_loss"]
    # the checkpoint holds the buffer's items, not the data set it was drawn from
    if plugin == "ReplayPlugin":
        size = (tmp_path / "cut" / "checkpoints" / "last.pt").stat().st_size
        assert size < 200_000


def test_plugins_run_inside_federated_clients(tmp_path):
    """In-process federation (3 clients, 2 rounds per experience): each client's EWCPlugin keeps
    its own Fisher across rounds through the strategy state, exactly like clsim's ``ewc``."""
    pytest.importorskip("flwr")
    federated = {"num_clients": 3, "rounds_per_experience": 2, "backend": "inprocess"}
    small = {"name": "class_incremental", "n_tasks": 2, "max_train_per_class": 24, "max_test_per_class": 10}
    ours = run(tmp_path, config({"name": "ewc", "lambda": 20.0, "mask_past": True, "fisher": "batch_mean"}, federated=federated,
                                scenario=small), "clsim")
    theirs = run(tmp_path, config(avalanche_strategy("EWCPlugin", ewc_lambda=10.0, mask_past=True),
                                  federated=federated, scenario=small), "avalanche")
    assert theirs["accuracy_matrix"] == ours["accuracy_matrix"]
    assert theirs["train_loss"] == pytest.approx(ours["train_loss"], rel=1e-5)


# ----------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("strategy, path, words", [
    ({"name": "avalanche", "plugin": "SynapticInteligencePlugin"}, "strategy.plugin",
     ["not an Avalanche training plugin", "SynapticIntelligencePlugin"]),
    ({"name": "avalanche", "plugin": "EvaluationPlugin"}, "strategy.plugin",
     ["EvaluationPlugin cannot run", "clsim evaluates"]),
    ({"name": "avalanche", "plugin": "SynapticIntelligencePlugin", "si_lamda": 1.0}, "strategy.si_lamda",
     ["did you mean 'si_lambda'"]),
    ({"name": "avalanche", "plugin": "EWCPlugin"}, "strategy.ewc_lambda", ["required by EWCPlugin"]),
    ({"name": "avalanche", "plugin": "EWCPlugin", "ewc_lambda": 1.0, "mode": "sideways"}, "strategy.mode",
     ["EWCPlugin expects 'separate' or 'online'"]),
    # type and range checks: these validated and then failed mid-run with a traceback
    ({"name": "avalanche", "plugin": "EWCPlugin", "ewc_lambda": "abc"}, "strategy.ewc_lambda",
     ["expects a number >= 0", "'abc'"]),
    ({"name": "avalanche", "plugin": "ReplayPlugin", "mem_size": -5}, "strategy.mem_size", ["an int >= 1, got -5"]),
    ({"name": "avalanche", "plugin": "ReplayPlugin", "mem_size": 2.5}, "strategy.mem_size", ["an int >= 1"]),
    ({"name": "avalanche", "plugin": "MASPlugin", "alpha": 2}, "strategy.alpha", ["in [0, 1]"]),
    ({"name": "avalanche", "plugin": "LwFPlugin", "temperature": 0}, "strategy.temperature", ["> 0"]),
    ({"name": "avalanche", "plugin": "GEMPlugin", "patterns_per_experience": 0, "memory_strength": 0.5},
     "strategy.patterns_per_experience", ["an int >= 1"]),
    # the plugin's own checks, caught at construction
    ({"name": "avalanche", "plugin": "EWCPlugin", "ewc_lambda": 1.0, "mode": "online"}, "strategy.plugin",
     ["EWCPlugin", "decay_factor"]),
])
def test_bad_plugin_input_is_one_line_and_exit_2(strategy, path, words, tmp_path, capsys):
    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump(config(strategy)))
    assert main(["validate", str(file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"clsim: error: {path}: ")
    for word in words:
        assert word in err


def test_penalty_plugins_keep_parameter_state():
    """SI, MAS and EWC hold state indexed like the model's weights (what sub-model federations
    such as FedRolex must refuse); replay, LwF and GEM do not."""
    keeps = {plugin: parse_config(config(avalanche_strategy(plugin))).strategy.build().keeps_parameter_state
             for plugin in PLUGINS}
    assert keeps == {"SynapticIntelligencePlugin": True, "MASPlugin": True, "EWCPlugin": True,
                     "LwFPlugin": False, "ReplayPlugin": False, "GEMPlugin": False}


def test_every_supported_plugin_is_known_and_refusals_name_real_plugins():
    import avalanche.training.plugins as plugins

    for name in (*SUPPORTED, *REFUSED):
        assert hasattr(plugins, name), name


def test_plugin_files_still_load_for_other_strategies():
    """``plugin:`` next to ``name:`` is the avalanche strategy's own argument; for any other
    strategy the two still conflict (a plugin *file* replaces the name)."""
    with pytest.raises(ConfigError, match="give either 'name' or 'plugin'"):
        parse_config(config({"name": "ewc", "plugin": "strategies/si.py:SI"}))


# ---------------------------------------------------------------- scenarios <-> benchmarks


def test_to_avalanche_keeps_experiences_items_and_class_order(tiny_scenario):
    bench = to_avalanche(tiny_scenario)
    assert len(bench.train_stream) == len(bench.test_stream) == len(tiny_scenario)
    for exp, ours in zip(bench.train_stream, tiny_scenario.experiences):
        assert sorted(exp.classes_in_this_experience) == list(ours.classes)
        x, y = ours.train.get_batch(torch.arange(len(ours.train)))
        items = [exp.dataset[i] for i in range(len(exp.dataset))]
        assert torch.equal(torch.stack([it[0] for it in items]), x)
        assert [int(it[1]) for it in items] == y.tolist()
        assert {int(it[2]) for it in items} == {0}  # class-incremental: one task label
    back = from_avalanche(bench)
    assert back.class_names == tuple(str(k) for k in range(tiny_scenario.num_classes))
    for a, b in zip(back.experiences, tiny_scenario.experiences):
        assert a.classes == b.classes and np.array_equal(a.test.targets, b.test.targets)


BENCHMARK_MODULE = '''
import torch
from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset


def blobs(*, n_classes=4, per_class=20, seed=0):
    """Gaussian blobs as 8x8 one-channel images, split 3 : 1 into train and test."""
    assert per_class >= 4, "per_class must be >= 4"
    if n_classes % 2:
        raise ValueError("n_classes must be even")
    gen = torch.Generator().manual_seed(99)
    means = 2 * torch.randn(n_classes, 1, 8, 8, generator=gen)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = means[y] + 0.5 * torch.randn(len(y), 1, 8, 8, generator=gen)
    test = torch.arange(len(y)) % 4 == 0
    make = lambda m: _make_taskaware_tensor_classification_dataset(x[m], y[m], task_labels=0, targets=y[m].tolist())
    return nc_benchmark(make(~test), make(test), n_experiences=2, task_labels=False, seed=seed,
                        fixed_class_order=[2, 0, 3, 1])
'''


@pytest.fixture
def benchmark_module(tmp_path, monkeypatch):
    (tmp_path / "my_benchmarks.py").write_text(textwrap.dedent(BENCHMARK_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_benchmarks:blobs"


def test_an_avalanche_benchmark_is_a_clsim_scenario(benchmark_module, tmp_path):
    """``scenario: {name: avalanche, benchmark: module:function}`` with an Avalanche plugin as
    the strategy: the whole stream is Avalanche's, the loop and the run folder clsim's."""
    raw = config(avalanche_strategy("ReplayPlugin"), scenario={
        "name": "avalanche", "benchmark": benchmark_module, "args": {"per_class": 20}})
    metrics = run(tmp_path, raw, "run")
    assert metrics["class_order"] == [2, 0, 3, 1]  # nc_benchmark's fixed order, learner label k = order[k]
    assert len(metrics["accuracy_matrix"]) == 2 and metrics["accuracy_matrix"][1][1] > 0.5
    report = (tmp_path / "run" / "report.md").read_text()
    assert "experience 0 (2 classes): 2, 0" in report
    assert "data" not in yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())


def test_an_avalanche_scenario_refuses_a_data_section_it_would_not_read(benchmark_module, tmp_path, capsys):
    raw = config({"name": "finetune"}, scenario={"name": "avalanche", "benchmark": benchmark_module})
    raw["data"] = {"name": "digits"}
    file = tmp_path / "both.yaml"
    file.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(file)]) == 2
    assert capsys.readouterr().err.startswith("clsim: error: data: scenario 'avalanche' brings its own data")


def test_from_avalanche_caps_and_labels(benchmark_module):
    from clsim.scenarios.avalanche import resolve_benchmark

    bench = resolve_benchmark(benchmark_module)(per_class=20)
    scenario = from_avalanche(bench, max_train_per_class=5, max_test_per_class=2)
    assert scenario.class_order == (2, 0, 3, 1) and scenario.input_shape == (1, 8, 8)
    assert [e.classes for e in scenario.experiences] == [(0, 1), (2, 3)]
    assert scenario.train_counts.tolist() == [5, 5, 5, 5]
    assert np.bincount(scenario.experiences[1].test.targets).tolist() == [0, 0, 2, 2]


@pytest.mark.parametrize("scenario, path, words", [
    ({"name": "avalanche", "benchmark": "no_such_module_xyz:make"}, "scenario.benchmark", ["cannot import"]),
    ({"name": "avalanche", "benchmark": "NotABenchmark"}, "scenario.benchmark", ["not a callable"]),
    ({"name": "avalanche", "benchmark": "BENCH", "args": {"colour": 1}}, "scenario.args", ["colour"]),
    # the callable's own checks: these were tracebacks
    ({"name": "avalanche", "benchmark": "BENCH", "args": {"n_classes": 3}}, "scenario.args", ["must be even"]),
    ({"name": "avalanche", "benchmark": "BENCH", "args": {"per_class": 0}}, "scenario.args", ["per_class must be"]),
    ({"name": "avalanche", "benchmark": "broken_benchmarks:make"}, "scenario.benchmark",
     ["importing 'broken_benchmarks' failed", "SyntaxError"]),
    # caps are checked before the benchmark is built (here: would fail on its arguments)
    ({"name": "avalanche", "benchmark": "BENCH", "args": {"colour": 1}, "max_train_per_class": 0},
     "scenario.max_train_per_class", [">= 1, got 0"]),
])
def test_bad_benchmark_is_one_line_and_exit_2(scenario, path, words, benchmark_module, tmp_path, capsys):
    scenario = dict(scenario, benchmark=scenario["benchmark"].replace("BENCH", benchmark_module))
    (tmp_path / "broken_benchmarks.py").write_text("def make(:\n    pass\n")  # on sys.path (fixture)
    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump(config({"name": "finetune"}, scenario=scenario)))
    assert main(["run", str(file), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"clsim: error: {path}: ")
    for word in words:
        assert word in err


def test_random_train_transforms_are_not_frozen_into_the_copied_items():
    """The items are copied once, through the eval transforms: a random training transform
    applied during the copy would fix one random draw of it for the whole run."""
    from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
    from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset

    x, y = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.arange(4).repeat(2)
    make = lambda: _make_taskaware_tensor_classification_dataset(x, y, task_labels=0, targets=y.tolist())
    bench = nc_benchmark(make(), make(), n_experiences=2, task_labels=False, fixed_class_order=[0, 1, 2, 3],
                         train_transform=lambda t: t + torch.rand(()), eval_transform=None)
    scenario = from_avalanche(bench)
    first = scenario.experiences[0].train
    got, _ = first.get_batch(torch.arange(len(first)))
    matches = (got[:, None] == x[None]).flatten(2).all(-1)  # copied item i == raw item j
    assert len(got) == 4 and matches.any(1).all()  # the raw items, no noise drawn


def test_a_domain_incremental_benchmark_is_refused():
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset

    def data():
        x, y = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 0, 1, 0, 1])
        return _make_taskaware_tensor_classification_dataset(x, y, task_labels=0, targets=y.tolist())

    bench = benchmark_from_datasets(train=[data(), data()], test=[data(), data()])
    with pytest.raises(ConfigError, match="repeats classes"):
        from_avalanche(bench)
