"""The rehearsal-free recipe's pieces (Smith et al. 2023, "A Closer Look at Rehearsal-Free CL"):
what trains (``train.trainable`` / ``frozen`` / ``lr_scale``), L2 / EWC anchored at the pretrained
weights from the first task, and EWC's Fisher estimators against hand computation."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clsim.config import TrainConfig, parse_dataclass
from clsim.data.base import ArrayDataset
from clsim.engine.engine import Engine
from clsim.engine.param_groups import check_globs, parameter_groups
from clsim.errors import ConfigError
from clsim.models.heads import IncrementalClassifier
from clsim.scenarios.base import Experience
from clsim.strategies.base import Finetune, Task
from clsim.strategies.ewc import EWC
from clsim.strategies.l2 import L2


def classifier(pretrained: bool = False, classes: int = 3) -> IncrementalClassifier:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5))
    model = IncrementalClassifier(backbone, 5, pretrained=pretrained)
    model.grow(classes)
    return model


def xy(n: int = 12, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.arange(n) % classes


def data(n: int = 12, classes: int = 3) -> ArrayDataset:
    return ArrayDataset(*xy(n, classes))


def task(classes=(0, 1, 2)) -> Task:
    d = data()
    return Task(Experience(0, tuple(classes), d, d), (), len(classes))


# ---------------------------------------------------------------- what trains, and how fast

def test_trainable_globs_freeze_the_rest_and_lr_scale_sets_group_rates():
    model = classifier()
    train = TrainConfig(lr=0.1, trainable=["backbone.2.*", "head.*"], lr_scale={"head.*": 10.0})
    groups = parameter_groups(model, train)
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    params = dict(model.named_parameters())
    assert by_lr == {0.1: {id(params["backbone.2.weight"]), id(params["backbone.2.bias"])},
                     1.0: {id(params["head.weight"]), id(params["head.bias"])}}
    assert not params["backbone.0.weight"].requires_grad and params["head.weight"].requires_grad


def test_only_the_selected_parameters_move_in_training():
    model = classifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = TrainConfig(lr=0.1, optimizer="adamw", weight_decay=0.1, trainable=["backbone.2.*"], frozen=["*.bias"])
    Engine(train, seed=0).fit(model, Finetune(), data(), experience=0, label="t")
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"backbone.2.weight"}  # weight decay and Adam leave the frozen ones bit for bit


@pytest.mark.parametrize("key, value", [("trainable", ["*.qkv.*"]), ("frozen", ["nope"]), ("lr_scale", {"x.*": 2.0})])
def test_a_glob_that_matches_nothing_is_an_error_naming_it(key, value):
    train = TrainConfig(**{key: value})
    with pytest.raises(ConfigError, match=re.escape(f"'{next(iter(value))}' matches no parameter")) as info:
        check_globs(classifier(), train)
    assert info.value.path == f"train.{key}"


def test_freezing_everything_selected_is_an_error():
    with pytest.raises(ConfigError, match="nothing would train") as info:
        check_globs(classifier(), TrainConfig(trainable=["head.*"], frozen=["head.*"]))
    assert info.value.path == "train.frozen"


@pytest.mark.parametrize("raw, key", [({"trainable": []}, "train.trainable"), ({"lr_scale": {"head.*": -1}}, "train.lr_scale.head.*"),
                                      ({"trainable": "head.*"}, "train.trainable")])
def test_bad_train_selection_values_name_the_key(raw, key):
    with pytest.raises(ConfigError) as info:
        parse_dataclass("train", raw, TrainConfig)
    assert info.value.path == key


def test_without_a_selection_the_optimizer_is_as_before():
    model = classifier()
    (group,) = parameter_groups(model, TrainConfig(lr=0.01))
    assert group["lr"] == 0.01 and [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]


# ---------------------------------------------------------------- first-task anchor

def moved_copy(model: nn.Module, by: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


@pytest.mark.parametrize("pretrained, option, penalised", [
    (True, "pretrained", True), (False, "pretrained", False), (False, "start", True), (True, "none", False)])
def test_l2_anchors_the_first_task_at_the_weights_it_starts_from(pretrained, option, penalised):
    model = classifier(pretrained=pretrained)
    strategy = L2(lambda_=2.0, first_task_anchor=option)
    strategy.setup(model)
    strategy.before_task(model, task())
    moved_copy(model, 0.1)
    x, y = xy()
    ce = F.cross_entropy(model(x), y)
    n = sum(p.numel() for p in model.parameters())
    expected = ce + (0.5 * 2.0 * n * 0.1 ** 2 if penalised else 0.0)  # lambda/2 * sum (0.1)^2
    torch.testing.assert_close(strategy.loss(model, x, y), expected)


def test_ewc_first_task_anchor_has_zero_fisher_and_its_l2_term_acts():
    model = classifier(pretrained=True)
    strategy = EWC(lambda_=5.0, l2=4.0)
    strategy.setup(model)
    strategy.before_task(model, task())
    moved_copy(model, 0.1)
    x, y = xy()
    n = sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(strategy.loss(model, x, y), F.cross_entropy(model(x), y) + 0.5 * 4.0 * n * 0.01)
    x, y = xy()
    strategy.after_task(model, task(), lambda: iter([(x, y)]))
    assert len(strategy.anchors) == 1 and not strategy.initial_anchor  # the zero-Fisher anchor is replaced


# ---------------------------------------------------------------- Fisher estimators by hand

def batch_grads(model: nn.Module, batches) -> list[dict[str, torch.Tensor]]:
    out = []
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("estimator", ["batch", "batch_mean", "example"])
def test_fisher_estimators_match_hand_computation(estimator):
    model = classifier()
    x, y = xy(10)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]  # unequal batches: 6 and 4
    strategy = EWC(fisher=estimator)
    strategy.setup(model)
    got = strategy.fisher(model, lambda: iter(batches))
    if estimator == "example":
        singles = batch_grads(model, [(x[i:i + 1], y[i:i + 1]) for i in range(10)])
        expected = {n: sum(g[n] ** 2 for g in singles) / 10 for n in got}
    else:
        grads = batch_grads(model, batches)
        sizes = [6, 4] if estimator == "batch" else [1, 1]
        expected = {n: sum(s * g[n] ** 2 for s, g in zip(sizes, grads)) / 2 for n in got}
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-8)


def test_the_batch_estimator_is_batch_size_times_batch_mean_for_equal_batches():
    model = classifier()
    x, y = xy(12)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    fishers = {}
    for estimator in ("batch", "batch_mean"):
        strategy = EWC(fisher=estimator)
        strategy.setup(model)
        fishers[estimator] = strategy.fisher(model, lambda: iter(batches))
    for n in fishers["batch"]:
        torch.testing.assert_close(fishers["batch"][n], 6 * fishers["batch_mean"][n])


def test_bad_ewc_options_name_the_key():
    with pytest.raises(ConfigError, match="strategy.fisher"):
        EWC(fisher="exact")
    with pytest.raises(ConfigError, match="strategy.first_task_anchor"):
        L2(first_task_anchor="always")
    with pytest.raises(ConfigError, match="strategy.l2"):
        EWC(l2=-1.0)


def test_train_selection_round_trips_through_the_config():
    train = TrainConfig(trainable=["*.qkv.*", "head.*"], frozen=["*.bias"], lr_scale={"head.*": 10.0})
    again = parse_dataclass("train", dataclasses.asdict(train), TrainConfig)
    assert again == train
