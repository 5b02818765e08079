"""Sub-model server strategies: FedConv's compression / dilation / aggregation, HeteroFL, FedRolex,
FedAvg on the smallest model, and whole runs over a three-tier fleet (in-process; the run
through Flower's simulation engine is marked slow)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

pytest.importorskip("flwr")
pytest.importorskip("flwr_datasets")

from torch.func import functional_call  # noqa: E402

from clsim.cli import main  # noqa: E402
from clsim.config import parse_config  # noqa: E402
from clsim.federated.fedconv import FedConv, compress, dilate, identity_kernel, kernel_shape  # noqa: E402
from clsim.federated.submodels import aggregate_windows, build_submodel, slice_state, window  # noqa: E402
from clsim.federated.substrategies import FedRolex, ServerContext, SubModelStrategy, Update  # noqa: E402
from test_federated import kill_after_round, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RATIOS = [1.0, 0.75, 0.5625]
MODELS = {
    "mlp": {"name": "mlp", "hidden": [16, 12]},
    "cnn": {"name": "cnn", "channels": [8, 16], "hidden": 16},
    "resnet_cifar": {"name": "resnet_cifar", "depth": 8, "width": 8},
}
RAW = {
    "name": "fedconv_tiny", "seed": 3,
    "data": {"name": "digits", "shift": 0},
    "scenario": {"name": "class_incremental", "n_tasks": 2, "max_train_per_class": 30, "max_test_per_class": 10},
    "model": MODELS["cnn"],
    "strategy": {"name": "ewc", "lambda": 10.0},
    "train": {"epochs": 1, "batch_size": 16},
    "federated": {"num_clients": 5, "rounds_per_experience": 2, "backend": "inprocess",
                  "partition": {"name": "dirichlet", "alpha": 0.5}, "public_fraction": 0.1,
                  "fleet": str(ROOT / "clients" / "edge_fleet.yaml")},
}


def model_pair(name: str, ratio: float, num_classes: int = 3) -> tuple[torch.nn.Module, torch.nn.Module]:
    config = parse_config({**RAW, "model": MODELS[name]})
    models = []
    for r in (1.0, ratio):
        torch.manual_seed(0)
        model = build_submodel(config.model, (1, 8, 8), r)
        model.grow(num_classes)
        models.append(model)
    return models[0], models[1]


def shrunk(big: torch.nn.Module, small: torch.nn.Module) -> list[tuple[str, tuple, tuple]]:
    g = dict(big.named_parameters())
    return [(k, tuple(g[k].shape), tuple(v.shape)) for k, v in small.named_parameters()]


# ---------------------------------------------------------------- sub-models

@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_submodels_keep_keys_and_shrink_only_hidden_sides(name, ratio):
    big, small = model_pair(name, ratio)
    assert big.state_dict().keys() == small.state_dict().keys()
    params = shrunk(big, small)
    first, head = params[0], [p for p in params if p[0] == "head.weight"][0]
    assert first[2][1:] == first[1][1:]  # the first layer keeps its input side
    assert head[2][0] == head[1][0] == 3  # the head keeps its classes
    if ratio < 1:
        assert head[2][1] < head[1][1] and first[2][0] < first[1][0]
        assert sum(v.numel() for v in small.parameters()) < sum(v.numel() for v in big.parameters())
    small(torch.zeros(2, 1, 8, 8))  # the sub-model is a working model


# ---------------------------------------------------------------- compression and dilation

@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_compression_gives_the_submodel_shapes_and_dilation_the_global_ones(name, ratio):
    big, small = model_pair(name, ratio)
    g = dict(big.named_parameters())
    gen = torch.Generator().manual_seed(0)
    dims = set()
    for key, gs, ss in shrunk(big, small):
        kernel = torch.randn(kernel_shape(gs, ss), generator=gen)  # any kernel, not only the identity
        sub = compress(g[key].detach(), kernel, ss)
        assert tuple(sub.shape) == ss, key
        assert tuple(dilate(sub, kernel, gs).shape) == gs, key
        dims.add(len(gs))
    assert dims == ({1, 2, 4} if name != "mlp" else {1, 2})  # biases/norms, matrices, conv weights


@pytest.mark.parametrize("shape", [(5,), (4, 6), (6, 3, 3, 3)])
def test_identity_kernels_at_ratio_one_round_trip_exactly(shape):
    t = torch.randn(shape)
    kernel = identity_kernel(shape, shape)
    assert kernel.shape[2:] == (1, 1)
    assert torch.equal(dilate(compress(t, kernel, shape), kernel, shape), t)


def test_identity_kernels_slice_and_zero_pad():
    t = torch.randn(6, 5, 3, 3)
    sub_shape = (4, 3, 3, 3)
    kernel = identity_kernel(t.shape, sub_shape)
    sub = compress(t, kernel, sub_shape)
    assert torch.equal(sub, t[:4, :3])  # HeteroFL's top-left slice at every spatial position
    back = dilate(sub, kernel, tuple(t.shape))
    assert torch.equal(back[:4, :3], t[:4, :3]) and back[4:].abs().sum() == 0 and back[:, 3:].abs().sum() == 0


def test_a_learned_kernel_mixes_neighbours_per_spatial_position():
    t = torch.arange(2 * 3 * 2 * 1, dtype=torch.float32).reshape(2, 3, 2, 1)  # (out, in, kh, kw)
    kernel = torch.zeros(kernel_shape((2, 3, 2, 1), (1, 2, 2, 1)))  # (P=2, 1, 2, 2)
    kernel[0, 0, 1, 1] = 1.0  # position 0 takes element [1, 1 + j]
    kernel[1, 0, 0, 0] = 2.0  # position 1 takes 2 x element [0, j]
    sub = compress(t, kernel, (1, 2, 2, 1))
    assert torch.equal(sub[..., 0, 0], t[1:2, 1:3, 0, 0])
    assert torch.equal(sub[..., 1, 0], 2 * t[0:1, 0:2, 1, 0])


def test_bounded_kernels_never_grow_a_weight_and_leave_a_delta_alone():
    from clsim.federated.fedconv import non_expansive

    t = torch.randn(6, 5)
    delta = identity_kernel((6, 5), (4, 3))
    assert torch.equal(non_expansive(delta), delta)
    gen = torch.Generator().manual_seed(0)
    kernel = 3.0 * torch.randn(delta.shape, generator=gen)  # a kernel with a large gain
    assert compress(t, kernel, (4, 3)).abs().max() > t.abs().max()
    assert compress(t, non_expansive(kernel), (4, 3)).abs().max() <= t.abs().max() + 1e-6
    sub = torch.randn(4, 3)
    assert dilate(sub, non_expansive(kernel), (6, 5)).abs().max() <= sub.abs().max() + 1e-6


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_gradients_of_the_submodel_loss_reach_every_compression_kernel(name):
    big, small = model_pair(name, 0.5625)
    gen = torch.Generator().manual_seed(1)  # trained-looking weights (fresh biases are 0: no gradient)
    g = {k: v.detach() + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
         for k, v in big.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    kernels = {k: identity_kernel(gs, ss).requires_grad_(True) for k, gs, ss in shrunk(big, small) if gs != ss}
    weights = slice_state(g, shapes) | {k: compress(g[k], kern, shapes[k]) for k, kern in kernels.items()}
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 3
    F.cross_entropy(functional_call(small, weights, (x,)), y).backward()
    for key, kernel in kernels.items():
        assert kernel.grad is not None and kernel.grad.abs().sum() > 0, key


# ---------------------------------------------------------------- HeteroFL / FedRolex

def test_heterofl_per_element_average_matches_a_hand_computed_example():
    old = {"w": torch.full((2, 3), 9.0), "b": torch.tensor([9.0, 9.0, 9.0])}
    small = {"w": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([1.0, 2.0])}  # top-left 1x2 and 2 of 3
    full = {"w": torch.tensor([[4.0, 5.0, 6.0], [7.0, 8.0, 9.5]]), "b": torch.tensor([4.0, 5.0, 6.0])}
    new = aggregate_windows(old, [(small, 1.0, 0), (full, 3.0, 0)])
    # held by both: (1 * small + 3 * full) / 4; by the full client only: its value
    assert torch.allclose(new["w"], torch.tensor([[(1 + 12) / 4, (2 + 15) / 4, 6.0], [7.0, 8.0, 9.5]]))
    assert torch.allclose(new["b"], torch.tensor([13 / 4, 17 / 4, 6.0]))
    only_small = aggregate_windows(old, [(small, 1.0, 0)])
    assert torch.equal(only_small["w"], torch.tensor([[1.0, 2.0, 9.0], [9.0, 9.0, 9.0]]))  # held by none: kept


def test_heterofl_with_full_size_clients_is_fedavg():
    old = {"w": torch.zeros(3, 2)}
    a, b = {"w": torch.ones(3, 2)}, {"w": torch.full((3, 2), 4.0)}
    assert torch.allclose(aggregate_windows(old, [(a, 2.0, 0), (b, 1.0, 0)])["w"], torch.full((3, 2), 2.0))


def test_fedrolex_window_rolls_one_index_per_round_and_wraps():
    assert [window((5,), (3,), FedRolex().offset(r))[0].tolist() for r in (1, 2, 4)] == [[0, 1, 2], [1, 2, 3], [3, 4, 0]]
    g = {"w": torch.arange(20.0).reshape(4, 5), "h": torch.arange(5.0)}
    shapes = {"w": (4, 3), "h": (3,)}
    round1, round3 = slice_state(g, shapes, 0), slice_state(g, shapes, 2)
    assert round3["w"][:, 0].tolist() == g["w"][:, 2].tolist() and round3["h"].tolist() == [2.0, 3.0, 4.0]
    assert not torch.equal(round1["w"], round3["w"])
    new = aggregate_windows(g, [({"w": torch.zeros(4, 3), "h": torch.zeros(3)}, 1.0, 4)])  # wraps: 4, 0, 1
    assert new["h"].tolist() == [0.0, 0.0, 2.0, 3.0, 0.0]


# ---------------------------------------------------------------- FedConv's server learning

def fedconv_setup(steps: int, **kwargs) -> tuple[FedConv, dict, list[Update]]:
    config = parse_config({**RAW, "model": MODELS["mlp"]})
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 8, 8, generator=gen), torch.arange(40) % 3
    strategy = FedConv(steps=steps, batch_size=16, **kwargs)
    strategy.bind(ServerContext(model=config.model, input_shape=(1, 8, 8), ratios=RATIOS,
                                grow=lambda m, n: m.grow(n), public=lambda t: (x, y), seed=0))
    big, _ = model_pair("mlp", 1.0)
    state = {k: v.detach() for k, v in big.state_dict().items()}
    updates = []
    for client, ratio in enumerate(RATIOS):
        sub = strategy.submodel(1, state, ratio)
        noisy = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in sub.items()}
        updates.append(Update(client, ratio, noisy, 10 * (client + 1)))
    return strategy, state, updates


def test_fedconv_without_learning_is_heterofl():
    strategy, state, updates = fedconv_setup(steps=0)
    heterofl = SubModelStrategy().combine(1, state, updates)
    ours = strategy.combine(1, state, updates)
    mean = FedConv(steps=0, aggregation="mean")
    mean.ctx = strategy.ctx
    plain = mean.combine(1, state, updates)
    for key in state:  # clients whose window misses an element weigh e^-6 (x their example share)
        scale = heterofl[key].abs().max().item()
        assert (ours[key] - heterofl[key]).abs().max() < 0.05 * scale, key
    # the plain mean of zero-padded dilations shrinks what only the full client holds
    scale = heterofl["head.weight"].abs().max().item()
    assert (plain["head.weight"] - heterofl["head.weight"]).abs().max() > 0.2 * scale


def test_fedconv_learning_moves_kernels_and_keeps_shapes():
    strategy, state, updates = fedconv_setup(steps=2, val_fraction=0)  # no selection: the last step is kept
    new = strategy.combine(1, state, updates)
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in state.items()}
    moved = [not torch.equal(k, identity_kernel(tuple(state[n].shape), tuple(updates[2].state[n].shape)))
             for n, k in strategy.compression[0.5625].items()]
    assert any(moved) and set(strategy.dilation) == {1, 2}  # full-size client 0 needs no dilation
    assert all(np.isfinite(v).all() for v in strategy.losses.values())


def test_fedconv_state_dict_round_trips():
    strategy, _, _ = fedconv_setup(steps=1)
    other = FedConv()
    other.load_state_dict(strategy.state_dict())
    assert other.compression.keys() == strategy.compression.keys()
    for r, kernels in strategy.compression.items():
        assert all(torch.equal(kernels[k], other.compression[r][k]) for k in kernels)
        assert all(v.requires_grad for v in other.compression[r].values())


# ---------------------------------------------------------------- whole runs

def with_server(server: dict, **federated) -> dict:
    raw = copy.deepcopy(RAW)
    raw["federated"] |= {"server": server, **federated}
    return raw


def test_the_public_set_is_held_out_of_every_client_partition():
    from clsim.federated.runtime import build_runtime

    rt = build_runtime(parse_config(with_server({"name": "fedconv"})))
    for t in range(len(rt.scenario)):
        public, parts = rt.public_indices(t), rt.partition(t, "train")
        together = np.concatenate([public, *parts])
        assert len(together) == len(np.unique(together)) == len(rt.scenario.experiences[t].train)
        assert 0.05 < len(public) / len(together) < 0.2  # public_fraction 0.1, stratified
    default = parse_config(with_server({"name": "fedconv"}, public_fraction=None))
    assert default.federated.public_fraction == 0.05
    assert parse_config(with_server({"name": "heterofl"}, public_fraction=None)).federated.public_fraction == 0


def test_three_tier_runs_send_smaller_models_to_smaller_clients(tmp_path):
    def raw(name: str) -> dict:
        # heterofl without sBN: its BN-statistics queries would add bytes fedconv does not send
        raw = with_server({"name": name, "static_bn": False} if name == "heterofl" else {"name": name})
        if name == "fedrolex":  # its rolling windows refuse EWC's per-parameter state
            raw["strategy"] = {"name": "finetune"}
        return raw

    results = {name: run(tmp_path, raw(name), name)
               for name in ("fedavg", "heterofl", "fedrolex", "fedavg_smallest", "fedconv")}
    for name, metrics in results.items():
        assert len(metrics["accuracy_matrix"]) == 2 and metrics["client_flops"] > 0, name
        assert all(len(accuracy) for accuracy in metrics["client_accuracy"]), name
    bytes_ = {n: m["communication_bytes"]["total"] for n, m in results.items()}
    flops = {n: m["client_flops"] for n, m in results.items()}
    assert bytes_["fedavg_smallest"] < bytes_["heterofl"] == bytes_["fedconv"] < bytes_["fedavg"]
    assert flops["fedavg_smallest"] < flops["heterofl"] == flops["fedconv"] < flops["fedavg"]
    assert all("server_s" in r for r in results["fedconv"]["rounds"]) and results["fedconv"]["server_time_s"] > 0


def test_fedconv_resumes_exactly_with_its_learned_kernels(tmp_path, monkeypatch):
    raw = with_server({"name": "fedconv", "steps": 2})
    volatile = ("wall_time_s", "rounds", "consolidation", "server_time_s")
    straight = run(tmp_path, raw, "straight")
    kill_after_round(monkeypatch, tmp_path, raw, "resumed", rounds=2)
    payload = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=False)
    assert payload["server_strategy"]["compression"]  # the learned kernels are in the checkpoint
    resumed = run(tmp_path, raw, "resumed", "--resume")
    assert {k: v for k, v in resumed.items() if k not in volatile} == \
           {k: v for k, v in straight.items() if k not in volatile}


@pytest.mark.parametrize("model, server, extra, path", [
    ({"name": "vit"}, "fedconv", {}, "model.name"),
    ({"name": "deit"}, "heterofl", {}, "model.name"),
    (MODELS["cnn"], "fedconv", {"public_fraction": 0}, "federated.public_fraction"),
    (MODELS["cnn"], {"name": "fedconv", "steps": -1}, {}, "federated.server.steps"),
    (MODELS["cnn"], {"name": "fedconv", "aggregation": "max"}, {}, "federated.server.aggregation"),
    (MODELS["cnn"], "heterofl", {"public_fraction": 0.7}, "federated.public_fraction"),
])
def test_bad_sub_model_input_is_one_line_and_exit_2(tmp_path, capsys, model, server, extra, path):
    raw = with_server(server if isinstance(server, dict) else {"name": server}, **extra)
    raw["model"] = model
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"clsim: error: {path}"), lines
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("strategy", [{"name": "ewc", "lambda": 1.0}, {"name": "l2", "lambda": 1.0},
                                      {"plugin": str(ROOT / "strategies" / "si.py") + ":SI"}])
def test_fedrolex_refuses_strategies_with_per_parameter_state(tmp_path, capsys, strategy):
    # the rolling window would apply a client's anchors and importances to other global channels
    raw = with_server({"name": "fedrolex"})
    raw["strategy"] = strategy
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clsim: error: federated.server.name") and "heterofl" in lines[0]
    for other in ("heterofl", "fedconv"):  # static windows, fixed-shape sub-models: aligned
        assert parse_config(with_server({"name": other}) | {"strategy": strategy}).federated.server.name == other
    ok = with_server({"name": "fedrolex"}) | {"strategy": {"name": "finetune"}}
    assert parse_config(ok).federated.server.name == "fedrolex"


@pytest.fixture
def federation(tmp_path):
    from clsim.engine.progress import Progress
    from clsim.federated.server import Federation

    raw = with_server({"name": "fedconv", "steps": 1})
    raw["data"]["shift"] = 2  # the training view augments: the public set must not
    return Federation(parse_config(raw), tmp_path / "run", Progress(quiet=True))


def test_the_public_set_is_unaugmented_and_server_work_leaves_the_global_rng_alone(federation):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    x, y = federation._public(0)
    federation.strategy.ctx.template(0.75, 5)
    flops = federation.client_flops(0)
    assert torch.equal(torch.get_rng_state(), before)  # resume is exact without reseeding anything
    public = federation.rt.public(0)
    experience, source = public.base, public.base.base  # View of a View of the digits ArrayDataset
    stored = source.images[torch.as_tensor(experience.indices[public.indices])]
    assert source.transform is not None and torch.equal(x, stored)  # not a random shift of them
    assert torch.equal(y, torch.as_tensor(public.targets)) and flops > 0


def test_server_caches_keep_only_the_current_head_and_public_set(federation):
    ctx = federation.strategy.ctx
    ctx.template(0.75, 5), ctx.template(0.5625, 5)
    assert ctx.template(0.75, 10).head.weight.shape[0] == 10
    assert list(ctx._templates) == [0.75]  # the 5-class templates are gone: heads only grow
    federation._public(0)
    x, _ = federation._public(1)
    assert list(federation._public_cache) == [2] and len(x) > len(federation._public(0)[0])


@pytest.mark.slow
def test_three_tier_fedconv_run_completes_through_flower_simulation(tmp_path):
    raw = with_server({"name": "fedconv", "steps": 2}, backend="simulation", num_clients=3)
    config = parse_config(raw)
    tiers = config.federated.fleet.assign(3, config.seed)
    assert len({t.model_size_ratio for t in tiers}) == 3  # phone, wearable, edge server: one each
    metrics = run(tmp_path, raw, "flower")
    inprocess = run(tmp_path, with_server({"name": "fedconv", "steps": 2}, num_clients=3), "inprocess")
    assert len(metrics["accuracy_matrix"]) == 2 and metrics["server_strategy"] == "fedconv"
    assert sum(len(r["aggregated"]) for r in metrics["rounds"]) > 0
    reasons = [why for r in metrics["rounds"] for why in r["failed"].values()]
    assert all("injected" in why for why in reasons)  # only the fleet's own dropouts
    assert metrics["failed_clients"] == inprocess["failed_clients"]
    assert metrics["accuracy_matrix"] == inprocess["accuracy_matrix"]  # the same apps, the same numbers
