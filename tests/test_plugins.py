"""Third-party strategies: the SI example plugin, and the three ways to plug a strategy in.

(a) ``@STRATEGIES.register(name)``, (b) the ``clsim.strategies`` entry-point group, (c) a file
path in YAML (``strategy: {plugin: strategies/si.py:SI}``). See docs/plugins.md.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import io
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import clsim.experiment
from clsim import STRATEGIES, Registry, Strategy, parse_config
from clsim.cli import main
from clsim.config import load_plugin, parse_section
from clsim.models.heads import IncrementalClassifier
from clsim.scenarios.base import Experience
from clsim.strategies.base import Finetune, Task
from clsim.strategies.l2 import L2

ROOT = Path(__file__).resolve().parents[1]
SI_FILE = ROOT / "strategies" / "si.py"
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"


def si_class() -> type:
    return load_plugin(f"{SI_FILE}:SI", "strategy.plugin")


def tiny_config(strategy: dict) -> dict:
    return {
        "name": "tiny", "seed": 1,
        "data": {"name": "synthetic", "num_classes": 4, "samples_per_class": 20, "image_size": 8,
                 "channels": 1},
        "scenario": {"name": "class_incremental", "n_tasks": 2},
        "model": {"name": "mlp", "hidden": [16]},
        "strategy": strategy,
        "train": {"epochs": 2, "batch_size": 16},
    }


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# -- SI on its own: tiny model, the engine's step written out -------------------------------


def tiny_model() -> IncrementalClassifier:
    torch.manual_seed(0)
    return IncrementalClassifier(nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh()), 8)


def task_data(classes: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=gen)  # (B, 6)
    y = torch.tensor(classes)[torch.randint(len(classes), (32,), generator=gen)]
    return x, y


def train_task(model, strategy, index: int, classes: tuple[int, ...], *, steps: int = 5,
               lr: float = 0.1, record: list | None = None) -> None:
    """One experience as the engine runs it: grow, before_task, steps, after_task.

    ``record`` collects per step: the task-loss gradient, the total-loss gradient, the
    parameters before the update and after it.
    """
    x, y = task_data(classes, seed=index)
    model.grow(max(classes) + 1)
    task = Task(Experience(index, classes, train=None, test=None), seen_classes=model.num_classes)
    strategy.before_task(model, task)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        if record is not None:  # at the weights the loss hook is about to see
            ce = F.cross_entropy(strategy.training_logits(model(x)), y)
            grads = torch.autograd.grad(ce, list(model.parameters()))
            before = [p.detach().clone() for p in model.parameters()]
        loss = strategy.loss(model, x, y, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        strategy.after_backward(model)
        opt.step()
        if record is not None:
            total = [p.grad.clone() for p in model.parameters()]
            record.append((grads, total, before, [p.detach().clone() for p in model.parameters()]))
    strategy.after_task(model, task, lambda: iter([(x, y)]))


def expected_importance(model, record, start, xi, old=None, *, gradient: int = 0) -> dict[str, torch.Tensor]:
    """Eq. 5 by hand: Omega = relu(old + (-sum g * delta) / ((theta_end - theta_start)^2 + xi)).

    ``gradient`` 0 uses the task-loss gradient, 1 the total-loss gradient.
    """
    names = [n for n, _ in model.named_parameters()]
    out = {}
    for i, n in enumerate(names):
        omega = -sum(step[gradient][i] * (step[3][i] - step[2][i]) for step in record)
        end = dict(model.named_parameters())[n].detach()
        new = omega / ((end - start[n]).pow(2) + xi)
        if old is not None:
            new[tuple(slice(0, s) for s in old[n].shape)] += old[n]
        out[n] = new.clamp(min=0)
    return out


def test_si_importance_is_the_path_integral_of_eq_5():
    SI = si_class()
    model, si = tiny_model(), SI(lambda_=1.0, xi=0.1)
    si.setup(model)
    model.grow(2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    record: list = []
    train_task(model, si, 0, (0, 1), record=record)
    expected = expected_importance(model, record, start, xi=0.1)
    for n, omega in si.importance.items():
        torch.testing.assert_close(omega, expected[n])
        assert omega.min() >= 0 and omega.sum() > 0, n  # plain SGD: omega = lr * g^2 >= 0
    assert set(si.anchor) == set(si.importance) == {n for n, _ in model.named_parameters()}


def test_si_uses_the_task_loss_gradient_not_the_surrogates():
    SI = si_class()
    model, si = tiny_model(), SI(lambda_=50.0, xi=0.1)
    si.setup(model)
    train_task(model, si, 0, (0, 1))
    first = {n: t.clone() for n, t in si.importance.items()}
    model.grow(4)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    record: list = []
    train_task(model, si, 1, (2, 3), record=record)
    expected = expected_importance(model, record, start, xi=0.1, old=first)
    for n, omega in si.importance.items():
        torch.testing.assert_close(omega, expected[n])
    # the test can tell the two apart: the total gradient would give another importance
    total = expected_importance(model, record, start, xi=0.1, old=first, gradient=1)
    assert not torch.allclose(total["backbone.1.weight"], expected["backbone.1.weight"])
    assert si.importance["head.weight"].shape == (4, 8)  # grown with the head


def test_si_penalty_is_zero_until_a_task_ends_then_grows_with_the_distance():
    SI = si_class()
    model, si = tiny_model(), SI(lambda_=2.0)
    si.setup(model)
    model.grow(2)
    x, y = task_data((0, 1), seed=0)
    si.before_task(model, Task(Experience(0, (0, 1), None, None), seen_classes=2))
    ce = F.cross_entropy(model(x), y)
    assert si.penalty(model) == 0 and torch.equal(si.loss(model, x, y), ce)
    train_task(model, si, 0, (0, 1))
    assert si.penalty(model) == 0  # at the anchor
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    assert si.penalty(model) > 0
    total = si.loss(model, x, y)
    torch.testing.assert_close(total - F.cross_entropy(model(x), y), 2.0 * si.penalty(model))


def test_si_masked_old_head_rows_keep_their_importance_and_do_not_move():
    SI = si_class()
    model, si = tiny_model(), SI(lambda_=1.0, mask_past=True)
    si.setup(model)
    train_task(model, si, 0, (0, 1))
    first = si.importance["head.weight"].clone()
    old_rows = model.head.weight[:2].detach().clone()
    train_task(model, si, 1, (2, 3))
    # Masked logits give old rows no task-loss gradient; at the anchor the surrogate adds none.
    assert torch.equal(model.head.weight[:2], old_rows)
    assert torch.equal(si.importance["head.weight"][:2], first)
    assert si.importance["head.weight"][2:].sum() > 0


def test_si_state_dict_round_trips_through_a_checkpoint():
    SI = si_class()
    model, si = tiny_model(), SI(lambda_=3.0, xi=0.5)
    si.setup(model)
    train_task(model, si, 0, (0, 1))
    train_task(model, si, 1, (2, 3))
    buffer = io.BytesIO()
    torch.save(si.state_dict(), buffer)
    buffer.seek(0)
    restored = SI(lambda_=3.0, xi=0.5)
    restored.setup(model)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for key in ("importance", "anchor"):
        for n, t in getattr(si, key).items():
            assert torch.equal(getattr(restored, key)[n], t), (key, n)
    with torch.no_grad():
        model.head.weight.add_(0.1)
    assert restored.penalty(model) == si.penalty(model) > 0


def test_si_rejects_bad_arguments_with_their_yaml_keys():
    SI = si_class()
    with pytest.raises(Exception, match="strategy.lambda"):
        SI(lambda_=-1.0)
    with pytest.raises(Exception, match="strategy.xi"):
        SI(xi=0.0)


def test_si_file_registers_only_in_its_own_registry_and_loads_twice():
    SI = si_class()
    assert load_plugin(f"{SI_FILE}:SI", "strategy.plugin") is SI  # cached per file
    spec = importlib.util.spec_from_file_location("si_loaded_again", SI_FILE)
    again = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(again)  # a second, distinct SI class: no registry collision
    assert again.SI is not SI and again.EXAMPLES.get("si") is again.SI
    assert "si" not in STRATEGIES
    assert issubclass(SI, Strategy)


# -- the registry-parametrized strategy tests, run on SI ----------------------------------------

# tests/test_strategies.py runs every registered strategy through the same contract tests; SI
# is loaded by path, so it is in no registry: register it for the duration of each test and
# call those tests on it. (API-generic ones only: some others read built-in internals.)
CONTRACT = [
    "test_strategy_trains_a_two_experience_stream",
    "test_resume_from_a_checkpoint_is_exact",
    "test_state_dict_round_trip_gives_identical_predictions_and_loss",
    "test_negative_lambda_is_a_config_error",
    "test_mask_past_masks_earlier_classes_in_the_loss",
    "test_mask_past_leaves_old_head_rows_untouched_in_training",
    "test_params_matching_nothing_is_a_config_error",
]
_spec = importlib.util.spec_from_file_location("clsim_strategy_contract", ROOT / "tests" / "test_strategies.py")
contract = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(contract)  # not collected under this name: its tests run once, there


def contract_cases() -> list:
    """(test name, its other parametrize arguments) for every case of the CONTRACT tests."""
    cases = []
    for test_name in CONTRACT:
        combos = [{}]
        for mark in getattr(getattr(contract, test_name, None), "pytestmark", []):
            if mark.name == "parametrize" and mark.args[0] != "name":
                combos = [c | {mark.args[0]: v} for c in combos for v in mark.args[1]]
        cases += [pytest.param(test_name, c, id="-".join([test_name, *map(str, c.values())])) for c in combos]
    return cases


@pytest.fixture
def si_name():
    """SI registered in clsim's STRATEGIES under a unique name, removed afterwards."""
    name = f"si_plugin_{uuid.uuid4().hex[:8]}"
    STRATEGIES.register(name)(si_class())
    yield name
    STRATEGIES.remove(name)


@pytest.mark.parametrize("test_name, params", contract_cases())
def test_si_passes_the_registry_parametrized_strategy_tests(test_name, params, si_name, request):
    assert hasattr(contract, test_name), f"tests/test_strategies.py has no {test_name} any more"
    request.getfixturevalue("single_thread")
    func = getattr(contract, test_name)
    kwargs = {p: si_name if p == "name" else params[p] if p in params else request.getfixturevalue(p)
              for p in inspect.signature(func).parameters}
    func(**kwargs)


# -- (c) by file path, end to end ----------------------------------------------------------


def test_si_plugin_runs_and_resumes_exactly_in_process(tmp_path, monkeypatch):
    raw = tiny_config({"plugin": f"{SI_FILE}:SI", "lambda": 10.0, "mask_past": True})
    config = write(tmp_path, raw)
    assert main(["run", str(config), "--out", str(tmp_path / "straight"), "--quiet"]) == 0

    real = clsim.experiment.train_and_evaluate

    def interrupted(learner, index, state):
        if index == 1:  # killed after the first checkpoint: SI's state must come back from it
            raise KeyboardInterrupt
        real(learner, index, state)

    monkeypatch.setattr(clsim.experiment, "train_and_evaluate", interrupted)
    out = tmp_path / "resumed"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 130
    monkeypatch.setattr(clsim.experiment, "train_and_evaluate", real)
    assert main(["run", str(config), "--out", str(out), "--quiet", "--resume"]) == 0
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["train_loss"] == b["train_loss"]


@pytest.mark.slow
def test_si_plugin_through_the_cli_by_relative_path(tmp_path):
    out = tmp_path / "si"
    clsim_script = Path(sys.executable).with_name("clsim")
    command = [str(clsim_script)] if clsim_script.exists() else [sys.executable, "-m", "clsim.cli"]
    result = subprocess.run(
        [*command, "run", "scenarios/quickstart.yaml", "--smoke", "--quiet", "--out", str(out),
         "--set", "strategy={plugin: strategies/si.py:SI, lambda: 1.0}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["accuracy_matrix"]) == 5
    strategy = yaml.safe_load((out / "config.yaml").read_text())["strategy"]
    assert strategy["plugin"] == f"{SI_FILE}:SI"  # resolved, absolute
    # the given key and every default of SI's constructor are recorded for an exact rerun
    assert strategy["lambda"] == 1.0 and strategy["xi"] == 0.1 and "params" in strategy


# -- bad plugin input: one line on stderr naming the key, exit code 2 ------------------------


@pytest.mark.parametrize("strategy, path, says", [
    ("{plugin: strategies/nope.py:SI}", "strategy.plugin", "plugin file 'strategies/nope.py' not found"),
    ("{plugin: strategies/si.py:SII}", "strategy.plugin", "defines no 'SII' (did you mean 'SI'?)"),
    ("{plugin: strategies/si.py}", "strategy.plugin", "expected 'path/to/file.py:ClassName'"),
    ("{plugin: strategies/si.py:SI, lamda: 1.0}", "strategy.lamda", "did you mean 'lambda'?"),
    ("{plugin: strategies/si.py:SI, lambda: big}", "strategy.lambda", "expected a number"),
    ("{plugin: strategies/si.py:SI, xi: 0}", "strategy.xi", "expected a number > 0"),
])
def test_bad_plugin_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, strategy, path, says):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "o"
    assert main(["run", str(QUICKSTART), "--smoke", "--quiet", "--out", str(out),
                 "--set", f"strategy={strategy}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"clsim: error: {path}: ") and says in lines[0], lines
    assert not out.exists()


@pytest.mark.slow
def test_bad_plugin_in_a_real_process_prints_no_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "clsim.cli", "validate", "scenarios/quickstart.yaml",
         "--set", "strategy={plugin: strategies/si.py:SII}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "clsim: error: strategy.plugin: 'strategies/si.py' defines no 'SII' (did you mean 'SI'?)"]


# -- (a) decorator registration --------------------------------------------------------------


class Recorder(Strategy):
    """A test strategy that records which hooks the engine calls, in order."""

    calls: list[str] = []

    def __init__(self, *, alpha: float = 1.0):
        self.alpha = alpha

    def setup(self, model):
        self.calls.append("setup")

    def before_task(self, model, task):
        self.calls.append(f"before_task {task.index}")
        return super().before_task(model, task)

    def after_backward(self, model):
        if self.calls[-1] != "after_backward":
            self.calls.append("after_backward")

    def after_step(self, model):
        if self.calls[-1] != "after_step":
            self.calls.append("after_step")

    def after_task(self, model, task, batches):
        self.calls.append(f"after_task {task.index}")

    def predict(self, model, x):
        if self.calls[-1] != "predict":
            self.calls.append("predict")
        return model(x)


@pytest.fixture
def registered_name():
    """A unique name in clsim's STRATEGIES, removed afterwards (Registry has no public remove)."""
    name = f"recorder_{uuid.uuid4().hex[:8]}"
    yield name
    STRATEGIES.remove(name)


def test_decorator_registration_in_a_fresh_registry():
    registry = Registry("strategy")
    assert registry.register("recorder")(Recorder) is Recorder  # the decorator returns the class
    registry.register("recorder")(Recorder)  # the same object again is fine
    with pytest.raises(ValueError, match="already registered"):
        registry.add("recorder", Finetune)
    section = parse_section("strategy", {"name": "recorder", "alpha": 2}, registry)
    assert section.factory is Recorder and section.build().alpha == 2.0  # int widened to float


def test_decorator_registration_in_clsim_strategies_runs_by_name(tmp_path, registered_name):
    STRATEGIES.register(registered_name)(Recorder)
    config = parse_config(tiny_config({"name": registered_name, "alpha": 3}))
    assert config.strategy.factory is Recorder and config.strategy.kwargs == {"alpha": 3.0}
    Recorder.calls = []
    clsim.experiment.run(config, tmp_path / "run", quiet=True)
    steps = ["after_backward", "after_step"] * 4  # tiny_config: 2 epochs x 2 batches per experience
    assert Recorder.calls == ["setup", "before_task 0", *steps, "after_task 0", "predict",
                              "before_task 1", *steps, "after_task 1", "predict"]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["strategy"] == {
        "name": registered_name, "alpha": 3.0}


# -- (b) entry points -------------------------------------------------------------------------


def fake_entry_points(monkeypatch, *entries):
    """Make ``importlib.metadata.entry_points(group=...)`` list ``entries`` for clsim.strategies."""
    STRATEGIES.names()  # clsim's own registry loads the real entry points first, unpatched

    def entry_points(**params):
        return [e for e in entries if e.group == params.get("group")]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_entry_point_registration(monkeypatch):
    ep = importlib.metadata.EntryPoint(name="My_L2", value="clsim.strategies.l2:L2", group="clsim.strategies")
    fake_entry_points(monkeypatch, ep)
    registry = Registry("strategy", entry_point_group="clsim.strategies")
    assert "my_l2" in registry and registry.get("my_l2") is L2  # names are lowercased
    section = parse_section("strategy", {"name": "my_l2", "lambda": 5}, registry)
    assert section.build().lambda_ == 5.0


def test_entry_point_colliding_with_a_different_object_raises(monkeypatch):
    ep = importlib.metadata.EntryPoint(name="my_l2", value="clsim.strategies.l2:L2", group="clsim.strategies")
    fake_entry_points(monkeypatch, ep)
    same = Registry("strategy", entry_point_group="clsim.strategies")
    same.add("my_l2", L2)  # decorated and advertised: the same object, no error
    assert same.get("my_l2") is L2
    other = Registry("strategy", entry_point_group="clsim.strategies")
    other.add("my_l2", Finetune)
    with pytest.raises(ValueError, match="'my_l2' is already registered"):
        other.get("my_l2")
