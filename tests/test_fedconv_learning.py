"""FedConv's server learning with a real budget (issue 14, items 1 and 3): epochs over the public
set, a validation part held out of it and selected on, the paper's initialisation and activation,
server fine-tuning of the global and the client models, and the same fine-tuning for HeteroFL
and FedRolex as the control."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

pytest.importorskip("flwr")

from clsim.cli import main  # noqa: E402
from clsim.config import parse_config  # noqa: E402
from clsim.federated import public_learning as pl  # noqa: E402
from clsim.federated.fedconv import FedConv, modified_leaky_relu, paper_kernel  # noqa: E402
from clsim.federated.submodels import build_submodel  # noqa: E402
from clsim.federated.substrategies import FedRolex, HeteroFL, ServerContext, Update  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RATIOS = [1.0, 0.75, 0.5625]
RAW = {
    "name": "fedconv_learning", "seed": 0,
    "data": {"name": "digits", "shift": 0},
    "scenario": {"name": "class_incremental", "n_tasks": 1},
    "model": {"name": "cnn", "channels": [8, 16], "hidden": 16},
    "strategy": {"name": "finetune"},
    "federated": {"num_clients": 4, "backend": "inprocess", "server": {"name": "fedconv"},
                  "fleet": str(ROOT / "clients" / "edge_fleet.yaml")},
}


@pytest.fixture(scope="module")
def digits():
    """A global CNN trained for 3 epochs on 1,200 digits, and a 100-image public set."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    config = parse_config(RAW)
    torch.manual_seed(0)
    model = build_submodel(config.model, (1, 8, 8), 1.0)
    model.grow(10)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    train = perm[:1200]
    for _ in range(3):
        for i in range(0, 1200, 32):
            optimizer.zero_grad()
            F.cross_entropy(model(x[train[i:i + 32]]), y[train[i:i + 32]]).backward()
            optimizer.step()
    public = perm[1200:1300]
    return config, {k: v.detach() for k, v in model.state_dict().items()}, (x[public], y[public])


def bound(strategy, config, public):
    strategy.bind(ServerContext(model=config.model, input_shape=(1, 8, 8), ratios=RATIOS,
                                grow=lambda m, n: m.grow(n), public=lambda t: public, seed=0))
    return strategy


# ---------------------------------------------------------------- the budget lowers the validation loss

def test_server_learning_lowers_the_held_out_validation_loss_materially(digits):
    """Compression of the trained global model to the wearables' r = 0.5625, 20 epochs on the
    public set's training part: the sub-model's loss on the held-out validation part falls by
    more than 12% (measured: 18%). With the earlier lr / window-size rates it moves by ~1%, and
    with L1-bounded kernels (which cannot scale a weight up) by ~1%."""
    config, state, public = digits

    def compressed(**kwargs) -> pl.Phase:
        strategy = bound(FedConv(epochs=20, batch_size=32, lr=3e-3, **kwargs), config, public)
        strategy.submodel(1, state, 0.5625)
        return strategy.phases["compress-0.5625"]

    phase = compressed()
    assert phase.epochs == 20 and phase.best_epoch > 0
    assert phase.val_best < 0.88 * phase.val_start, phase
    old = compressed(lr_scale="window")
    assert old.val_start == phase.val_start  # the same start, the same validation part
    assert old.val_best > 0.97 * old.val_start, old  # the old rates: ~1%
    bounded = compressed(bounded=True)
    assert phase.val_best < bounded.val_best <= bounded.val_start, bounded


def test_dilation_and_aggregation_also_learn_on_the_public_set(digits):
    config, state, public = digits
    strategy = bound(FedConv(epochs=5, batch_size=32, lr=3e-3, bounded=False, client_finetune=2,
                             finetune_lr=1e-3), config, public)
    updates = [Update(c, r, strategy.submodel(1, state, r), 50) for c, r in enumerate(RATIOS)]
    new = strategy.combine(1, state, updates)
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in state.items()}
    names = set(strategy.phases)
    assert {"dilate-1", "dilate-2", "aggregate"} <= names
    assert {f"finetune-client-{c}" for c in range(3)} <= names  # full-size client 0 too, as the code
    for name in ("dilate-1", "dilate-2", "aggregate"):
        phase = strategy.phases[name]
        assert phase.val_best <= phase.val_start and phase.epochs == 5, (name, phase)


# ---------------------------------------------------------------- the validation part and the selection

def test_the_public_split_is_stratified_disjoint_and_a_function_of_the_seed():
    y = torch.tensor([0] * 10 + [1] * 5 + [2])
    train, val = pl.split_public(y, 0.2, seed=3)
    assert sorted(train.tolist() + val.tolist()) == list(range(16))
    assert sorted(y[val].tolist()) == [0, 0, 1]  # round(0.2 * 10) = 2, round(0.2 * 5) = 1, a lone item stays
    again, _ = pl.split_public(y, 0.2, seed=3)
    other, _ = pl.split_public(y, 0.2, seed=4)
    assert torch.equal(train, again) and not torch.equal(train, other)


def test_selection_keeps_the_best_validation_epoch_and_restores_it():
    """Training pulls w to 1, validation wants 0: the start (w = 0) is never beaten, so the phase
    ends where it began; with validation at w = 0.5 the kept epoch is the one closest to it."""
    x, y = torch.zeros(8, 1), torch.zeros(8, dtype=torch.long)
    for target, best_epoch in ((0.0, 0), (0.5, None)):
        w = torch.zeros(1, requires_grad=True)
        val = lambda: float((w.detach() - target) ** 2)  # noqa: E731, B023
        phase = pl.learn([{"params": [w], "lr": 0.1}], lambda xb, yb: ((w - 1) ** 2).sum(), val, (x, y),
                         epochs=10, steps=None, batch_size=8, seed=[0])
        assert phase.epochs == 10
        if best_epoch == 0:
            assert phase.best_epoch == 0 and float(w.detach()) == 0.0 and phase.val_best == phase.val_start == 0.0
        else:
            assert 0 < phase.best_epoch < 10 and abs(float(w.detach()) - 0.5) < 0.1 and phase.val_best == val()


def test_patience_stops_a_phase_that_no_longer_improves():
    w = torch.zeros(1, requires_grad=True)
    phase = pl.learn([{"params": [w], "lr": 0.1}], lambda xb, yb: ((w - 1) ** 2).sum(), lambda: float(w.detach() ** 2),
                     (torch.zeros(4, 1), torch.zeros(4)), epochs=50, steps=None, batch_size=4, seed=[0], patience=3)
    assert phase.epochs == 3 and phase.best_epoch == 0 and float(w.detach()) == 0.0


# ---------------------------------------------------------------- the paper's initialisation and activation

def test_modified_leaky_relu_is_the_codes():
    t = torch.tensor([-2.0, -0.5, 0.0, 1.0, 4.0])
    assert torch.allclose(modified_leaky_relu(t), torch.tensor([-0.002, -0.0005, 0.0, 0.85, 3.4]))


def test_paper_kernels_are_pytorch_default_conv_init_and_seeded():
    g, s = (16, 8, 3, 3), (9, 5, 3, 3)
    k = paper_kernel(g, s, torch.Generator().manual_seed(0))
    assert k.shape == (9, 1, 8, 4) and k.abs().max() <= 1 / (8 * 4) ** 0.5 and k.std() > 0.05
    assert torch.equal(k, paper_kernel(g, s, torch.Generator().manual_seed(0)))


def test_paper_init_and_activation_produce_the_codes_submodel(digits):
    config, state, public = digits
    strategy = bound(FedConv(steps=0, init="paper", activation="mlr", bounded=False), config, public)
    sub = strategy.submodel(1, state, 0.75)
    kernels = strategy.compression[0.75]
    from clsim.federated.fedconv import compress

    key = "backbone.0.weight"
    expected = modified_leaky_relu(compress(state[key], kernels[key].detach(), tuple(sub[key].shape)))
    assert torch.allclose(sub[key], expected)
    assert (sub[key] > -1e-2).all()  # MLR squashes negatives to 0.001x
    again = bound(FedConv(steps=0, init="paper", activation="mlr", bounded=False), config, public)
    assert torch.equal(again.submodel(1, state, 0.75)[key], sub[key])  # seeded: resume draws the same


# ---------------------------------------------------------------- the control: the same fine-tuning for the baselines

@pytest.mark.parametrize("factory", [HeteroFL, FedRolex, FedConv])
def test_global_finetuning_lowers_the_validation_loss_for_every_sub_model_strategy(digits, factory):
    config, state, public = digits
    strategy = bound(factory(finetune=10, finetune_lr=1e-3, batch_size=32), config, public)
    tuned = strategy.finetune_global(1, state)
    phase = strategy.phases["finetune"]
    assert phase.val_best < 0.95 * phase.val_start and phase.best_epoch > 0, phase
    assert tuned.keys() == state.keys() and not torch.equal(tuned["head.weight"], state["head.weight"])
    assert all(torch.equal(tuned[k], state[k]) for k in state if "running" in k or "num_batches" in k)


def test_finetune_makes_a_baseline_hold_the_public_set():
    def resolved(server):
        raw = copy.deepcopy(RAW)
        raw["federated"]["server"] = server
        return parse_config(raw).federated.public_fraction

    assert resolved({"name": "heterofl"}) == 0
    assert resolved({"name": "heterofl", "finetune": 10}) == 0.05 == resolved({"name": "fedrolex", "finetune": 1})
    assert resolved({"name": "fedconv"}) == 0.05


@pytest.mark.parametrize("server, path", [
    ({"name": "heterofl", "finetune": -1}, "federated.server.finetune"),
    ({"name": "fedrolex", "finetune_lr": 0}, "federated.server.finetune_lr"),
    ({"name": "heterofl", "val_fraction": 1.0}, "federated.server.val_fraction"),
    ({"name": "fedconv", "epochs": 5, "steps": 5}, "federated.server.epochs"),
    ({"name": "fedconv", "epochs": 1.5}, "federated.server.epochs"),
    ({"name": "fedconv", "lr_scale": "kernel"}, "federated.server.lr_scale"),
    ({"name": "fedconv", "init": "random"}, "federated.server.init"),
    ({"name": "fedconv", "activation": "relu"}, "federated.server.activation"),
    ({"name": "fedconv", "client_finetune": True}, "federated.server.client_finetune"),
    ({"name": "fedconv", "patience": 0}, "federated.server.patience"),
    ({"name": "heterofl", "client_finetune": 2}, "federated.server.client_finetune"),
])
def test_bad_server_learning_options_are_one_line_and_exit_2(tmp_path, capsys, server, path):
    raw = copy.deepcopy(RAW)
    raw["federated"]["server"] = server
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"clsim: error: {path}"), lines
