"""Prompting methods (L2P, DualPrompt, CODA-Prompt) and the linear probe: their components against
hand computation, the frozen backbone, and end-to-end runs through clsim with exact resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from timm.models.vision_transformer import Attention

from clsim.config import parse_config
from clsim.errors import ConfigError
from clsim.experiment import run
from clsim.models.prompt_vit import (CodaPool, L2PPool, coda_prompt_vit, dualprompt_vit, gram_schmidt, l2p_vit,
                                     ortho_penalty, prefix_attention)
from clsim.registry import MODELS
from clsim.strategies.base import Task
from clsim.strategies.prompting import CodaPrompt, L2P, LinearProbe

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (1, 8, 8)
TINY = {"embed_dim": 16, "depth": 2, "num_heads": 2}


def tiny(factory, **kwargs):
    torch.manual_seed(0)
    return factory(SHAPE, **(TINY | kwargs))


def task(index: int, classes=(0, 1)) -> Task:
    from clsim.scenarios.base import Experience
    return Task(Experience(index, tuple(classes), None, None), seen_classes=max(classes) + 1)


# --------------------------------------------------------------------------- components by hand

def test_l2p_selects_the_top_k_keys_by_cosine():
    pool = L2PPool(3, pool_size=4, length=2, top_k=2, layers=(0,))
    with torch.no_grad():
        pool.keys.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]))
    q = torch.tensor([[2.0, 0.1, 0.0], [0.0, 0.0, 5.0]])
    idx, sim = pool.select(q)
    # by hand: cos(q0, .) = [.9988, .0499, 0, .7416]; cos(q1, .) = [0, 0, 1, 0]
    n0 = math.sqrt(4.01)
    assert torch.allclose(sim[0], torch.tensor([2 / n0, 0.1 / n0, 0.0, 2.1 / n0 / math.sqrt(2)]), atol=1e-6)
    assert idx[0].tolist() == [0, 3]
    assert idx[1][0].item() == 2
    # the selected prompts enter as prefixes: first half keys, second half values, top-k concatenated
    prefixes, losses = pool(q, train=True)
    pk, pv = prefixes[0]
    assert pk.shape == (2, 2, 3) and torch.equal(pk[0, 1], pool.prompts[0, 3, 0]) and torch.equal(pv[0, 0], pool.prompts[0, 0, 1])
    expected = sum(1 - sim[b, i] for b in range(2) for i in idx[b])
    assert torch.allclose(losses["pull"], expected)
    assert pool(q, train=False)[1] == {}


def test_prefix_attention_equals_hand_computed_attention_with_prefix_kv():
    torch.manual_seed(0)
    attn = Attention(4, num_heads=1, qkv_bias=True).eval()
    x, pk, pv = torch.randn(1, 3, 4), torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    W, b = attn.qkv.weight, attn.qkv.bias
    q, k, v = (x[0] @ W.T + b).split(4, dim=1)
    keys, values = torch.cat([pk[0], k]), torch.cat([pv[0], v])  # (2 + 3, 4)
    scores = (q @ keys.T) / math.sqrt(4)
    by_hand = torch.softmax(scores, dim=1) @ values @ attn.proj.weight.T + attn.proj.bias
    with torch.no_grad():
        out = prefix_attention(attn, x, (pk, pv))
        plain = prefix_attention(attn, x, None)
    torch.testing.assert_close(out[0], by_hand)
    torch.testing.assert_close(plain, attn(x))  # without a prefix: timm's attention exactly


def test_prefix_attention_splits_the_prefix_into_heads_like_the_tokens():
    torch.manual_seed(1)
    attn = Attention(4, num_heads=2).eval()
    x, pk, pv = torch.randn(2, 3, 4), torch.randn(2, 1, 4), torch.randn(2, 1, 4)
    with torch.no_grad():
        out = prefix_attention(attn, x, (pk, pv))
        q, k, v = attn.qkv(x).split(4, dim=-1)
        heads = []
        for h in range(2):
            s = slice(2 * h, 2 * h + 2)
            keys, values = torch.cat([pk[..., s], k[..., s]], 1), torch.cat([pv[..., s], v[..., s]], 1)
            heads.append(torch.softmax(q[..., s] @ keys.transpose(1, 2) / math.sqrt(2), -1) @ values)
        torch.testing.assert_close(out, attn.proj(torch.cat(heads, -1)))


def test_coda_weights_and_weighted_prompt_by_hand():
    pool = CodaPool(2, pool_size=2, length=2, layers=(0,), n_tasks=1)
    P = torch.tensor([[[1.0, 0], [0, 1]], [[2.0, 2], [3, 3]]])  # (M=2, L=2, D=2)
    K = torch.tensor([[1.0, 0], [1, 1]])
    A = torch.tensor([[1.0, 2], [0.5, 0]])
    with torch.no_grad():
        pool.prompts[0], pool.keys[0], pool.attention[0] = P, K, A
    q = torch.tensor([[1.0, 1.0]])
    # alpha_m = cos(q * A_m, K_m): q*A_0 = (1, 2) vs (1, 0) -> 1/sqrt5; q*A_1 = (.5, 0) vs (1, 1) -> 1/sqrt2
    a0, a1 = 1 / math.sqrt(5), 1 / math.sqrt(2)
    alpha = CodaPool.weights(q, K[None], A[None])
    torch.testing.assert_close(alpha, torch.tensor([[[a0, a1]]]))
    prefixes, losses = pool(q, train=True)
    prompt = a0 * P[0] + a1 * P[1]  # (L, D): row 0 the prefix key, row 1 the value
    torch.testing.assert_close(prefixes[0][0][0], prompt[:1])
    torch.testing.assert_close(prefixes[0][1][0], prompt[1:])
    expected = ortho_penalty(K) + ortho_penalty(A) + ortho_penalty(P.flatten(1))
    torch.testing.assert_close(losses["ortho"], expected)


def test_ortho_penalty_by_hand():
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # t t^T = [[1, 1], [1, 2]]; minus I -> [[0, 1], [1, 1]]; mean of squares = 3/4
    assert ortho_penalty(t).item() == pytest.approx(0.75)
    assert ortho_penalty(torch.eye(3)).item() == 0.0


def test_gram_schmidt_new_rows_are_orthonormal_to_everything_before():
    torch.manual_seed(0)
    old = torch.randn(6, 8)
    out = gram_schmidt(old, 2, 5)
    assert torch.equal(out[:2], old[:2]) and torch.equal(out[5:], torch.zeros(1, 8))
    gram = out[:5] @ out[2:5].T
    torch.testing.assert_close(gram[2:], torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(gram[:2], torch.zeros(2, 3), atol=1e-5, rtol=0)
    full = gram_schmidt(torch.zeros(5, 2), 0, 5)  # more rows than dimensions: still unit, finite
    assert torch.isfinite(full).all() and torch.allclose(full.norm(dim=1), torch.ones(5))


def test_dualprompt_trains_the_tasks_e_prompt_and_predicts_with_the_nearest_key():
    model = tiny(dualprompt_vit, pool_size=3, prompt_length=2, g_length=2, g_layers=[0], e_layers=[1])
    pool = model.prompt
    with torch.no_grad():
        pool.keys.copy_(torch.eye(3, 16))
    pool.start_task(2)
    q = torch.zeros(2, 16)
    q[0, 0], q[1, 1] = 1.0, 1.0
    idx, sim = pool.select(q, train=True)
    assert idx.tolist() == [2, 2]
    assert pool.select(q, train=False)[0].tolist() == [0, 1]
    prefixes, losses = pool(q, train=True)
    assert set(prefixes) == {0, 1} and prefixes[0][0].shape == (2, 1, 16)
    assert torch.equal(prefixes[1][0][0, 0], pool.prompts[0, 2, 0])
    assert losses["pull"].item() == pytest.approx(2.0)  # 1 - cos = 1 for both queries
    with pytest.raises(ConfigError) as info:
        pool.start_task(3)
    assert info.value.path == "model.pool_size"


# --------------------------------------------------------------------------- models and strategies

@pytest.mark.parametrize("factory", [l2p_vit, dualprompt_vit, coda_prompt_vit])
def test_prompts_change_the_features_and_query_is_the_plain_vit(factory):
    model = tiny(factory).eval()
    model.grow(2)
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        plain = model.backbone.vit(x)
        torch.testing.assert_close(model.backbone.query(x), plain)
        assert not torch.allclose(model.features(x), plain)


@pytest.mark.parametrize("factory, kwargs, key", [
    (l2p_vit, {"pool_size": 3, "top_k": 4}, "model.top_k"),
    (l2p_vit, {"prompt_length": 0}, "model.prompt_length"),
    (l2p_vit, {"prompt_length": 3}, "model.prompt_length"),
    (l2p_vit, {"prompt_layers": [2]}, "model.prompt_layers"),
    (l2p_vit, {"prompt_layers": []}, "model.prompt_layers"),
    (dualprompt_vit, {"e_layers": [0, 5]}, "model.e_layers"),
    (dualprompt_vit, {"g_length": 0}, "model.g_length"),
    (coda_prompt_vit, {"pool_size": 5, "n_tasks": 10}, "model.pool_size"),
    (coda_prompt_vit, {"n_tasks": 0}, "model.n_tasks"),
    (coda_prompt_vit, {"prompt_layers": [-1]}, "model.prompt_layers"),
])
def test_bad_prompt_sizes_name_the_key(factory, kwargs, key):
    with pytest.raises(ConfigError) as info:
        tiny(factory, **kwargs)
    assert info.value.path == key and "\n" not in str(info.value)


def test_a_strategy_refuses_another_methods_model():
    with pytest.raises(ConfigError) as info:
        L2P().setup(tiny(coda_prompt_vit))
    assert info.value.path == "model.name"


def test_coda_earlier_components_do_not_change_while_training_a_later_task(make_source):
    from clsim.config import TrainConfig
    from clsim.engine.engine import Engine

    model = tiny(coda_prompt_vit, pool_size=4, n_tasks=2, prompt_length=2)
    strategy = CodaPrompt(ortho_weight=0.1)
    strategy.setup(model)
    from clsim.scenarios.builders import class_incremental
    scenario = class_incremental(make_source([6] * 4, shape=SHAPE), 0, n_tasks=2)
    engine = Engine(TrainConfig(epochs=1, batch_size=4, lr=0.05, optimizer="adamw", weight_decay=0.5), seed=0)
    pool = model.prompt
    for index in (0, 1):
        model.grow(2 * (index + 1))
        before = [p.detach().clone() for p in (pool.prompts, pool.keys, pool.attention)]
        data = strategy.before_task(model, Task(scenario.experiences[index], seen_classes=2 * (index + 1)))
        if index == 1:
            allocated = [p.detach().clone() for p in (pool.prompts, pool.keys, pool.attention)]
            # task 1's components were Gram-Schmidt initialised in before_task; task 0's kept
            assert all(torch.equal(a[:, :2], b[:, :2]) for a, b in zip(allocated, before))
            assert not torch.equal(allocated[1][:, 2:], before[1][:, 2:])
        engine.fit(model, strategy, data, experience=index, label="t")
        after = [p.detach() for p in (pool.prompts, pool.keys, pool.attention)]
        start, stop = pool.span(index)
        for a, b in zip(after, before):
            assert torch.equal(a[:, :start], b[:, :start])  # earlier tasks: bit-identical
        assert not torch.equal(after[1][:, start:stop], (allocated if index else before)[1][:, start:stop])


# --------------------------------------------------------------------------- through clsim

STRATEGY_MODEL = {
    "l2p": {"name": "l2p_vit", "pool_size": 4, "top_k": 2, "prompt_length": 4},
    "dualprompt": {"name": "dualprompt_vit", "pool_size": 2, "prompt_length": 4, "g_length": 2},
    "coda_prompt": {"name": "coda_prompt_vit", "pool_size": 4, "n_tasks": 2, "prompt_length": 4},
    "linear_probe": {"name": "vit"},
}


def tiny_config(strategy: str, tmp_path, **model) -> dict:
    return {
        "name": f"tiny_{strategy}", "seed": 0,
        "data": {"name": "synthetic", "num_classes": 4, "samples_per_class": 20, "image_size": 8, "channels": 1},
        "scenario": {"name": "class_incremental", "n_tasks": 2},
        "model": STRATEGY_MODEL[strategy] | TINY | model,
        "strategy": {"name": strategy},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.01},
    }


def run_config(raw: dict, out, **kwargs) -> dict:
    return run(parse_config(copy.deepcopy(raw)), out, quiet=True, **kwargs)


@pytest.mark.parametrize("strategy", list(STRATEGY_MODEL))
def test_strategy_trains_end_to_end_keeps_the_backbone_frozen_and_resumes_exactly(
        strategy, tmp_path, stop_before_experience, monkeypatch):
    from conftest import Stopped
    from clsim import learner as learner_module

    raw = tiny_config(strategy, tmp_path)
    built = {}
    original_build = learner_module.Learner.build.__func__

    def build(cls, *args, **kwargs):  # keep the learner and its model's initial ViT weights
        made = original_build(cls, *args, **kwargs)
        vit = made.model.backbone.vit if strategy != "linear_probe" else made.model.backbone
        built["vit"], built["initial"] = vit, copy.deepcopy(vit.state_dict())
        built["model"] = made.model
        return made

    monkeypatch.setattr(learner_module.Learner, "build", classmethod(build))
    full = run_config(raw, tmp_path / "full")
    assert len(full["train_loss"]) == 2 and all(math.isfinite(v) for v in full["train_loss"])
    row = full["accuracy_matrix"][1]
    assert all(0 <= a <= 1 for a in row)
    for key, value in built["vit"].state_dict().items():  # the backbone is bit-identical
        assert torch.equal(value, built["initial"][key]), key
    if strategy != "linear_probe":  # the prompts are what trains
        assert all(p.requires_grad for p in built["model"].prompt.parameters())

    undo = stop_before_experience(1)
    with pytest.raises(Stopped):
        run_config(raw, tmp_path / "cut")
    undo()
    resumed = run_config(raw, tmp_path / "cut", resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["train_loss"] == full["train_loss"]


def test_linear_probe_moves_only_the_head(tiny_scenario, make_learner):
    from clsim.experiment import train_and_evaluate
    from clsim.engine.checkpoint import RunState

    learner = make_learner(tiny_scenario, LinearProbe())
    backbone = copy.deepcopy(learner.model.backbone.state_dict())
    state = RunState()
    for index in range(2):
        train_and_evaluate(learner, index, state)
    assert all(torch.equal(v, backbone[k]) for k, v in learner.model.backbone.state_dict().items())
    assert learner.model.head.weight.requires_grad


@pytest.mark.parametrize("name, model", [("l2p", "l2p_vit"), ("dualprompt", "dualprompt_vit"),
                                         ("coda_prompt", "coda_prompt_vit")])
def test_a_prompt_config_with_another_model_is_refused_before_running(name, model, tmp_path):
    raw = tiny_config(name, tmp_path) | {"model": {"name": "vit"} | TINY}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.path == "model.name" and model in str(info.value)


def test_registered_names():
    assert {"l2p_vit", "dualprompt_vit", "coda_prompt_vit"} <= set(MODELS.names())
