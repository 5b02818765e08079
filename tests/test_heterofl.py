"""HeteroFL's and FedRolex's code pieces against hand computation: the width Scaler, static BN
(sBN) and its statistics query, masked logits of absent classes, per-label head aggregation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clsim.config import parse_config
from clsim.federated.submodels import (LabelMask, Scaler, aggregate_windows, bn_statistics, build_submodel,
                                       fold_bn_statistics, held_labels, mask_absent, static_batch_norm)
from clsim.federated.substrategies import FedRolex, HeteroFL, SmallestFedAvg, SubModelStrategy, Update
from clsim.models.heads import IncrementalClassifier

RAW = {"name": "heterofl_tiny", "seed": 0, "data": {"name": "digits", "shift": 0},
       "scenario": {"name": "class_incremental", "n_tasks": 1}, "strategy": {"name": "finetune"},
       "model": {"name": "cnn", "channels": [4, 6], "hidden": 8}}


def cnn(ratio: float, **options) -> nn.Module:
    torch.manual_seed(0)
    model = build_submodel(parse_config(RAW).model, (1, 8, 8), ratio, **options)
    model.grow(3)
    return model


# ---------------------------------------------------------------- the Scaler

def test_scaler_divides_by_the_rate_in_training_only():
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]])), layer.bias.zero_()
    layer.register_forward_hook(Scaler(0.5))
    x = torch.tensor([[1.0, 1.0]])
    assert torch.equal(layer.train()(x), torch.tensor([[6.0, 14.0]]))  # (3, 7) / 0.5
    assert torch.equal(layer.eval()(x), torch.tensor([[3.0, 7.0]]))


def test_scalers_sit_after_every_backbone_layer_and_not_on_the_head():
    model = cnn(0.5, scaler_rate=0.5)
    hooked = [n for n, m in model.named_modules() if any(isinstance(h, Scaler) for h in m._forward_hooks.values())]
    assert hooked == ["backbone.0", "backbone.4", "backbone.9"]  # conv, conv, hidden linear
    assert set(model.state_dict()) == set(cnn(0.5).state_dict())  # hooks: the keys are the global model's
    plain, x = cnn(0.5), torch.randn(4, 1, 8, 8)
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    assert torch.equal(model(x), plain(x))  # identity in eval
    assert not any(m._forward_hooks for m in cnn(1.0, scaler_rate=1.0).modules())  # rate 1: no scaler


# ---------------------------------------------------------------- masked logits

def test_masked_logits_are_zero_in_training_and_the_loss_and_gradients_are_the_codes():
    head = IncrementalClassifier(nn.Identity(), 2, num_classes=3)
    with torch.no_grad():
        head.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])), head.head.bias.zero_()
    mask_absent(head, [0, 2])  # the client holds classes 0 and 2
    x, y = torch.tensor([[2.0, 3.0]]), torch.tensor([0])
    logits = head.train()(x)
    assert logits.tolist() == [[2.0, 0.0, 5.0]]  # class 1's logit (3) is masked to 0
    loss = F.cross_entropy(logits, y)
    # the code's CE still counts the masked class: -2 + log(e^2 + e^0 + e^5)
    assert math.isclose(loss.item(), -2 + math.log(math.exp(2) + 1 + math.exp(5)), rel_tol=1e-6)
    loss.backward()
    assert head.head.weight.grad[1].abs().sum() == 0 and head.head.bias.grad[1] == 0  # absent row: no gradient
    assert head.head.weight.grad[0].abs().sum() > 0 and head.head.weight.grad[2].abs().sum() > 0
    assert head.eval()(x).tolist() == [[2.0, 3.0, 5.0]]  # evaluation is unmasked


def test_held_labels_are_the_classes_of_the_clients_data():
    class Data:
        def __init__(self, targets):
            self.targets = targets

        def __len__(self):
            return len(self.targets)

    assert held_labels([Data([2, 0, 2]), Data([]), Data([5])]) == [0, 2, 5]
    assert LabelMask([4, 1]).classes == [1, 4]


# ---------------------------------------------------------------- per-label head aggregation

def test_head_rows_are_averaged_over_the_clients_holding_each_class():
    # 2 clients, 3 classes, head [3, 2]: client a holds {0, 1}, client b holds {1, 2}; uniform weights
    old = {"head.weight": torch.full((3, 2), 9.0), "head.bias": torch.full((3,), 9.0), "w": torch.zeros(2)}
    a = {"head.weight": torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]), "head.bias": torch.tensor([1.0, 2.0, 3.0]),
         "w": torch.tensor([1.0, 1.0])}
    b = {"head.weight": torch.tensor([[5.0, 5.0], [6.0, 6.0], [7.0, 7.0]]), "head.bias": torch.tensor([5.0, 6.0, 7.0]),
         "w": torch.tensor([3.0, 3.0])}
    new = aggregate_windows(old, [(a, 1.0, 0), (b, 1.0, 0)], [[0, 1], [1, 2]])
    # class 0: a only (1); class 1: both (2 + 6) / 2 = 4; class 2: b only (7); the body: both (2)
    assert new["head.weight"].tolist() == [[1.0, 1.0], [4.0, 4.0], [7.0, 7.0]]
    assert new["head.bias"].tolist() == [1.0, 4.0, 7.0] and new["w"].tolist() == [2.0, 2.0]
    kept = aggregate_windows(old, [(a, 1.0, 0)], [[0]])  # a class no client holds keeps its row
    assert kept["head.weight"].tolist() == [[1.0, 1.0], [9.0, 9.0], [9.0, 9.0]]
    plain = aggregate_windows(old, [(a, 1.0, 0), (b, 1.0, 0)])  # without labels: every row from both
    assert plain["head.bias"].tolist() == [3.0, 4.0, 5.0]


def test_strategies_combine_with_the_reported_labels():
    old = {"head.weight": torch.zeros(3, 1), "head.bias": torch.zeros(3)}
    ups = [Update(0, 1.0, {"head.weight": torch.ones(3, 1), "head.bias": torch.ones(3)}, 10, [0]),
           Update(1, 1.0, {"head.weight": torch.full((3, 1), 4.0), "head.bias": torch.full((3,), 4.0)}, 30, [0, 1])]
    assert HeteroFL().combine(1, old, ups)["head.bias"].tolist() == [2.5, 4.0, 0.0]  # uniform: (1 + 4) / 2
    examples = HeteroFL(weighting="examples").combine(1, old, ups)["head.bias"].tolist()
    assert examples == [(10 + 120) / 40, 4.0, 0.0]
    assert FedRolex().combine(1, old, ups)["head.bias"].tolist() == [2.5, 4.0, 0.0]
    assert SubModelStrategy().combine(1, old, ups)["head.bias"].tolist() == [(10 + 120) / 40] * 3  # off: FedAvg


# ---------------------------------------------------------------- sBN

def test_static_bn_trains_with_batch_statistics_and_updates_no_running_statistics():
    model = cnn(1.0, static_bn=True)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}
    x = torch.randn(8, 1, 8, 8)
    out = model.train()(x)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    plain = cnn(1.0)
    assert torch.allclose(plain.train()(x), out)  # the same batch-statistics forward as plain BN training
    assert not torch.equal(plain.state_dict()["backbone.1.running_mean"], before["backbone.1.running_mean"])


def test_bn_statistics_are_the_codes_mean_over_batches_and_fold_across_clients():
    bn = nn.Sequential(nn.BatchNorm1d(1))
    static_batch_norm(bn)
    batches = [(torch.tensor([[1.0], [3.0]]), None), (torch.tensor([[2.0], [6.0], [10.0]]), None)]
    sums, n = bn_statistics(bn, batches)
    # batch means 2 and 6; unbiased variances 2 and 16 (momentum=None: cumulative average over batches)
    assert n == 2 and sums["0.running_mean"].tolist() == [8.0] and sums["0.running_var"].tolist() == [18.0]
    assert bn[0].running_mean.tolist() == [0.0] and not bn[0].track_running_stats  # left as it was
    other, m = bn_statistics(bn, [(torch.tensor([[0.0], [2.0]]), None)])  # mean 1, variance 2
    state = fold_bn_statistics(bn.state_dict(), [(sums, n), (other, m)])
    assert state["0.running_mean"].tolist() == [3.0]  # (8 + 1) / 3 batches
    assert math.isclose(state["0.running_var"].item(), 20 / 3, rel_tol=1e-6)  # (18 + 2) / 3
    assert int(state["0.num_batches_tracked"]) == 3


# ---------------------------------------------------------------- options on the wire

def test_client_options_are_the_codes_for_heterofl_and_fedrolex_and_absent_otherwise():
    h = HeteroFL()
    assert h.client_options(0.5) == {"scaler-rate": 0.5, "static-bn": True, "mask-absent": True, "report-labels": True}
    assert "scaler-rate" not in h.client_options(1.0) and h.bn_stats and FedRolex().bn_stats
    assert SubModelStrategy().client_options(0.5) == {} and not SubModelStrategy().bn_stats
    smallest = SmallestFedAvg()
    assert smallest.client_options(0.5) == {} and not smallest.bn_stats  # FedAvg on the small model
    assert HeteroFL(scaler=False, static_bn=False, mask_absent=False, label_aggregation=False).client_options(0.5) == {}
    from clsim.federated.fedconv import FedConv

    assert FedConv().client_options(0.5) == {} and not FedConv().bn_stats  # the paper's client side
    assert FedConv(static_bn=True).client_options(0.5) == {"static-bn": True} and FedConv(static_bn=True).bn_stats


def test_bad_options_are_config_errors():
    from clsim.errors import ConfigError

    with pytest.raises(ConfigError, match="federated.server.scaler"):
        HeteroFL(scaler="yes")


def test_full_width_clients_holding_every_class_reduce_to_uniform_fedavg():
    # full width: no scaler; every class held: the mask and the per-label head change nothing;
    # what is left is FedAvg with each client counting 1 (the code's weighting) plus sBN
    model = cnn(1.0, scaler_rate=1.0, static_bn=True)
    mask_absent(model, [0, 1, 2])
    plain, x = cnn(1.0), torch.randn(4, 1, 8, 8)
    assert torch.allclose(model.train()(x), plain.train()(x))
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    subs = [{k: v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in state.items()}
            for _ in range(2)]
    ups = [Update(k, 1.0, s, 10 * (k + 1), [0, 1, 2]) for k, s in enumerate(subs)]
    new = HeteroFL().combine(1, state, ups)
    for key, value in state.items():
        if value.is_floating_point():
            assert torch.allclose(new[key], (subs[0][key] + subs[1][key]) / 2), key


# ---------------------------------------------------------------- sBN for the clients' own sub-models

FLEET = {"name": "two_widths", "tiers": [{"name": "full", "share": 0.5, "model_size_ratio": 1.0},
                                         {"name": "narrow", "share": 0.5, "model_size_ratio": 0.5}]}


@pytest.mark.parametrize("server, own", [({"name": "heterofl"}, True), ({"name": "fedrolex"}, True),
                                         ({"name": "heterofl", "static_bn": False}, False)])
def test_narrow_clients_evaluate_with_their_own_bn_statistics_under_sbn(tmp_path, monkeypatch, server, own):
    # the global model's statistics, sliced, are not a narrower model's: under sBN every narrower
    # client computes its own on its partition before its accuracy is measured; full-width clients
    # keep the global statistics, and without sBN nothing is recomputed
    import clsim.federated.client as client
    from clsim.experiment import run
    from clsim.federated.submodels import batch_norms

    calls = []
    original = client._own_bn_statistics

    def spy(job, learner, exp):
        before = {n: bn.running_mean.clone() for n, bn in batch_norms(learner.model)}
        original(job, learner, exp)
        sums, batches = client._bn_sums(job, learner, exp)
        after = dict(batch_norms(learner.model))
        assert batches and all(torch.allclose(after[n].running_mean, sums[f"{n}.running_mean"] / batches)
                               for n in before)
        assert any(not torch.equal(before[n], after[n].running_mean) for n in before)
        calls.append((job.client, learner.model.head.in_features))

    monkeypatch.setattr(client, "_own_bn_statistics", spy)
    raw = RAW | {"train": {"epochs": 1, "batch_size": 32, "lr": 1e-3},
                 "federated": {"num_clients": 4, "rounds_per_experience": 1, "backend": "inprocess",
                               "fleet": FLEET, "server": server, "eval_every_round": False}}
    config = parse_config(raw)
    run(config, tmp_path, quiet=True)
    narrow = {k for k, tier in enumerate(config.federated.fleet.assign(4, config.seed)) if tier.name == "narrow"}
    assert {k for k, _ in calls} == (narrow if own else set())
    assert all(width == 4 for _, width in calls)  # hidden 8 at ratio 0.5: the narrow model itself
