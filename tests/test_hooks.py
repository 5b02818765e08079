"""The hook API itself: wrappers forward every hook, FedProx is an exact loss term, and the
learner calls ``before_task`` only to train (never to evaluate or consolidate)."""

from __future__ import annotations

import copy
import inspect
import json
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clsim.config import TrainConfig
from clsim.data.base import ArrayDataset
from clsim.engine.engine import Engine
from clsim.strategies.base import CAPABILITIES, HOOKS, Finetune, Strategy, StrategyWrapper

pytestmark = pytest.mark.usefixtures("single_thread")

FORWARDED = (*HOOKS, "state_dict", "load_state_dict")


# ---------------------------------------------------------------- StrategyWrapper


def _recorder(name: str):
    def hook(self, *args, **kwargs):
        result = object()  # a fresh object: only a forwarded return can be it
        self.calls.append((name, args, kwargs, result))
        return result

    hook.__name__ = name
    return hook


class Recording(Strategy):
    """Every forwarded method records its arguments and returns a fresh sentinel."""

    def __init__(self):
        self.calls: list[tuple] = []


for _name in FORWARDED:
    setattr(Recording, _name, _recorder(_name))
for _name in CAPABILITIES:  # every capability unlike the base class's default
    _default = getattr(Strategy, _name)
    setattr(Recording, _name, (not _default) if isinstance(_default, bool) else "some_model")


def positional(name: str) -> list[str]:
    """The hook's parameters after ``self``, as the base class declares them."""
    return list(inspect.signature(getattr(Strategy, name)).parameters)[1:]


def test_the_hook_list_is_every_overridable_method_of_strategy():
    # a hook added to Strategy but not to HOOKS would silently not be forwarded by wrappers
    public = {n for n, v in vars(Strategy).items() if callable(v) and not n.startswith("_")}
    assert public == set(HOOKS) | {"training_logits", "state_dict", "load_state_dict"}
    assert len(HOOKS) == len(set(HOOKS)) == 9


@pytest.mark.parametrize("name", FORWARDED)
def test_wrapper_forwards_each_hook_with_its_arguments_and_returns_its_result(name):
    inner = Recording()
    wrapper = StrategyWrapper(inner)
    args = tuple(object() for _ in positional(name))
    out = getattr(wrapper, name)(*args)
    assert inner.calls == [(name, args, {}, out)]
    kwargs = {p: object() for p in positional(name)}  # by keyword too
    out = getattr(wrapper, name)(**kwargs)
    assert inner.calls[-1] == (name, (), kwargs, out)


@pytest.mark.parametrize("name", CAPABILITIES)
def test_wrapper_declares_the_wrapped_strategys_capabilities(name):
    assert getattr(StrategyWrapper(Recording()), name) == getattr(Recording, name) != getattr(Strategy, name)


def test_a_wrapper_overrides_one_hook_and_forwards_the_rest(tiny_mlp):
    class PlusOne(StrategyWrapper):
        def loss(self, model, x, y, extra=None):
            return self.inner.loss(model, x, y, extra) + 1.0

    model = tiny_mlp()
    model.grow(3)
    x, y = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    wrapped = PlusOne(Finetune())
    torch.testing.assert_close(wrapped.loss(model, x, y), F.cross_entropy(model(x), y) + 1.0)
    assert torch.equal(wrapped.predict(model, x), model(x))


# ---------------------------------------------------------------- FedProx


def one_sgd_step(model, mu: float | None, x, y, anchor: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``model`` after one engine step (SGD, lr 0.1, no momentum) with the proximal term
    around ``anchor`` (``mu`` None: no term)."""
    from clsim.federated.proximal import proximal_term

    model = copy.deepcopy(model)
    terms = []
    if mu is not None:
        at_anchor = copy.deepcopy(model)
        at_anchor.load_state_dict(anchor)
        term = proximal_term(at_anchor, mu=mu)  # anchored at the weights it holds now
        terms = [term]
    engine = Engine(TrainConfig(epochs=1, batch_size=len(y), lr=0.1, optimizer="sgd", momentum=0.0,
                                weight_decay=0.0), seed=0)
    engine.fit(model, Finetune(), ArrayDataset(x, y.numpy()), experience=0, label="t", terms=terms)
    return model


def test_fedprox_term_changes_one_sgd_step_exactly_as_its_gradient_says(tiny_mlp):
    from clsim.federated.proximal import proximal_term

    torch.manual_seed(0)
    model = tiny_mlp(seed=3)
    model.grow(3)
    w0 = copy.deepcopy(model.state_dict())  # the global model the client received
    with torch.no_grad():  # local training has moved away from it: the term's gradient is not 0
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    w1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 2, 1, 0])
    mu, lr = 0.5, 0.1

    # the term's value: mu/2 * ||w - w0||^2
    at_anchor = copy.deepcopy(model)
    at_anchor.load_state_dict(w0)
    distance = sum(((w1[n] - w0[n]) ** 2).sum() for n in w1)
    torch.testing.assert_close(proximal_term(at_anchor, mu=mu)(model), 0.5 * mu * distance)

    # d/dw [CE(w) + mu/2 ||w - w0||^2] = dCE/dw + mu (w - w0); SGD: w2 = w1 - lr * that
    probe = copy.deepcopy(model)
    ce_grad = torch.autograd.grad(F.cross_entropy(probe(x), y), list(probe.parameters()))
    ce_grad = dict(zip([n for n, _ in probe.named_parameters()], ce_grad))
    expected = {n: w1[n] - lr * (ce_grad[n] + mu * (w1[n] - w0[n])) for n in w1}
    plain = {n: w1[n] - lr * ce_grad[n] for n in w1}

    stepped = dict(one_sgd_step(model, mu, x, y, w0).named_parameters())
    without = dict(one_sgd_step(model, None, x, y, w0).named_parameters())
    at_zero = dict(one_sgd_step(model, 0.0, x, y, w0).named_parameters())
    for n in w1:
        torch.testing.assert_close(stepped[n].detach(), expected[n], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(without[n].detach(), plain[n], rtol=1e-5, atol=1e-7)
        assert torch.equal(at_zero[n], without[n]), n  # mu = 0 adds exactly nothing
    # and mu > 0 is not mu = 0: the step differs by lr * mu * (w1 - w0), here well above rounding
    gap = max(float((stepped[n] - at_zero[n]).detach().abs().max()) for n in w1)
    assert gap > 1e-3
    for n in w1:
        torch.testing.assert_close((at_zero[n] - stepped[n]).detach(), lr * mu * (w1[n] - w0[n]),
                                   rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- before_task only trains

RECORDER = '''
import json, sys
from pathlib import Path

from clsim.strategies.base import Finetune


def caller() -> str:
    """Which message handler (or the server) this hook runs under, innermost first."""
    frame, server = sys._getframe(2), False
    while frame is not None:
        path, name = Path(frame.f_code.co_filename), frame.f_code.co_name
        if path.parent.name == "federated" and path.name == "client.py" and name in ("_train", "_consolidate"):
            return name.strip("_")
        server |= path.parent.name == "federated" and path.name == "server.py"
        frame = frame.f_back
    return "server" if server else "other"


class HookLog(Finetune):
    """Fine-tuning that appends, for every call of the hooks it watches, who called it."""

    def __init__(self, *, log: str = ""):
        super().__init__()
        self.log = log

    def _write(self, hook, index=None):
        with open(self.log, "a") as f:
            f.write(json.dumps({"hook": hook, "by": caller(), "task": index}) + "\\n")

    def before_task(self, model, task):
        self._write("before_task", task.index)
        return super().before_task(model, task)

    def after_task(self, model, task, batches):
        self._write("after_task", task.index)

    def predict(self, model, x):
        self._write("predict")
        return super().predict(model, x)
'''


def test_before_task_is_called_only_by_clients_train_messages(tmp_path):
    pytest.importorskip("flwr")
    from test_federated import run, tiny

    plugin, log = tmp_path / "hook_log.py", tmp_path / "hooks.jsonl"
    plugin.write_text(textwrap.dedent(RECORDER))
    raw = tiny()  # 3 clients, 2 experiences x 2 rounds, in-process
    raw["strategy"] = {"plugin": f"{plugin}:HookLog", "log": str(log)}
    metrics = run(tmp_path, raw, "fed")
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    by = {hook: sorted({c["by"] for c in calls if c["hook"] == hook}) for hook in ("before_task", "after_task", "predict")}

    trained = sum(len(r["sampled"]) for r in metrics["rounds"])
    assert trained == 3 * 2 * 2 and all(not r["failed"] for r in metrics["rounds"])
    before = [c for c in calls if c["hook"] == "before_task"]
    assert by["before_task"] == ["train"] and len(before) == trained  # once per train message
    assert sorted(c["task"] for c in before) == [0] * 6 + [1] * 6
    # the rest of the protocol did run, without before_task: consolidation (after_task, the
    # clients' own-test accuracy) and the server's evaluation of the global model
    assert by["after_task"] == ["consolidate"] and sum(c["hook"] == "after_task" for c in calls) == 3 * 2
    assert {"server", "consolidate"} <= set(by["predict"]) and "train" not in by["predict"]
    assert Path(tmp_path / "fed" / "metrics.json").exists()
