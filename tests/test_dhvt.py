"""DHVT (Lu et al. 2022): SOPE, DAFF and head tokens by hand; the model contract; runs.

What is tested: SOPE's token count and layer layout for several patch sizes (by hand), the affine
maps act per channel, DAFF's depthwise conv sees the 2-D grid (one patch moves only its 3x3
neighbours' outputs) and its squeeze-excitation re-scales the class tokens, HI-MHSA equals a
hand-written attention over ``[tokens, head tokens]``, shapes for any image size and channel
count, growing heads keep old rows, the distilled variant's two heads (DeiT's protocol, what
deit_lt trains), every registered strategy trains it, a CLI run resumes exactly, and a
federated fedavg run builds it in the clients.
"""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from clsim.cli import main
from clsim.config import TrainConfig, parse_config
from clsim.engine.checkpoint import RunState
from clsim.engine.engine import Engine
from clsim.errors import ConfigError
from clsim.experiment import run, train_and_evaluate
from clsim.learner import Learner
from clsim.models.deit import DistilledIncrementalClassifier
from clsim.models.dhvt import DAFF, SOPE, HeadInteractedAttention, dhvt, dhvt_distilled
from clsim.registry import STRATEGIES
from clsim.strategies.base import split_prediction

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {"embed_dim": 16, "depth": 1, "num_heads": 2}


def tiny(shape=(3, 8, 8), *, distilled: bool = False, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return (dhvt_distilled if distilled else dhvt)(shape, **(TINY | kwargs))


def randomise_norm_stats(model: nn.Module) -> None:
    """BatchNorm running statistics away from (0, 1), so eval mode is not the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)


# --------------------------------------------------------------------------- SOPE


@pytest.mark.parametrize("shape, patch, grid, widths", [
    ((3, 8, 8), 2, (4, 4), [16]),
    ((3, 16, 16), 4, (4, 4), [8, 16]),
    ((1, 12, 12), 4, (3, 3), [8, 16]),          # 12 -> 6 -> 3
    ((3, 8, 16), 2, (4, 8), [16]),              # not square
    ((3, 10, 10), 4, (3, 3), [8, 16]),          # 10 -> 5 -> 3: each stage ceil(s / 2)
    ((3, 32, 32), 16, (2, 2), [2, 4, 8, 16]),   # the code's patch-16 widths D/8, D/4, D/2, D
    ((3, 16, 16), 8, (2, 2), [4, 8, 16]),
])
def test_sope_token_count_and_widths_by_hand(shape, patch, grid, widths):
    sope = SOPE(patch_size=patch, in_chans=shape[0], embed_dim=16)
    convs = [m for m in sope.proj if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == widths
    assert all(c.kernel_size == (3, 3) and c.stride == (2, 2) and c.padding == (1, 1) and c.bias is None
               for c in convs)
    tokens, got = sope(torch.randn(2, *shape))
    assert got == grid and tokens.shape == (2, grid[0] * grid[1], 16)


@pytest.mark.parametrize("patch, layout", [
    (2, ["Conv2d", "BatchNorm2d", "GELU"]),  # the code's patch-2 SOPE ends with GELU
    (4, ["Conv2d", "BatchNorm2d", "GELU", "Conv2d", "BatchNorm2d"]),
    (16, ["Conv2d", "BatchNorm2d", "GELU"] * 3 + ["Conv2d", "BatchNorm2d"]),
])
def test_sope_layers_are_the_codes(patch, layout):
    assert [type(m).__name__ for m in SOPE(patch_size=patch, in_chans=3, embed_dim=32).proj] == layout


def test_sope_affine_maps_act_per_channel():
    torch.manual_seed(0)
    sope = SOPE(patch_size=4, in_chans=3, embed_dim=16).eval()
    x = torch.randn(2, 3, 8, 8)
    scaled = x.clone()
    scaled[:, 1] = 3 * x[:, 1] - 0.5
    with torch.no_grad():
        expected, _ = sope(scaled)  # identity affine maps at initialisation
        sope.pre_affine.alpha[0, 1] = 3.0
        sope.pre_affine.beta[0, 1] = -0.5
        got, _ = sope(x)
        torch.testing.assert_close(got, expected)
        sope.post_affine.alpha.fill_(2.0)
        sope.post_affine.beta.fill_(1.0)
        torch.testing.assert_close(sope(x)[0], 2 * expected + 1)


@pytest.mark.parametrize("size, convs", [(8, 1), (16, 1), (32, 2), (64, 3), (224, 4)])
def test_default_patch_follows_the_image_size(size, convs):
    """As vit: 2 at 8 and 16 px, 4 at 32 px (the paper's CIFAR DHVT), 8 at 64, 16 at 224."""
    model = dhvt((3, size, size), embed_dim=16, depth=1, num_heads=2)
    sope = model.backbone.patch_embed
    assert sum(isinstance(m, nn.Conv2d) for m in sope.proj) == convs


# --------------------------------------------------------------------------- DAFF


def neighbours(r: int, c: int, rows: int, cols: int) -> set[int]:
    return {i * cols + j for i in range(max(r - 1, 0), min(r + 2, rows))
            for j in range(max(c - 1, 0), min(c + 2, cols))}


@pytest.mark.parametrize("r, c", [(1, 3), (0, 0), (2, 4), (0, 2)])
def test_daff_one_patch_moves_only_its_grid_neighbours(r, c):
    """A 3 x 5 grid, row-major tokens: the depthwise 3x3 conv is the only spatial mixing, so
    perturbing patch (r, c) changes exactly the patches within one step of it (no wrap-around
    at the borders, rows and columns not swapped), and the class token through the SE."""
    torch.manual_seed(0)
    daff = DAFF(8, 16, num_prefix=1).eval()  # eval: BatchNorm is per-channel, not batch-wide
    randomise_norm_stats(daff)
    rows, cols = 3, 5
    x = torch.randn(1, 1 + rows * cols, 8)
    moved = x.clone()
    moved[0, 1 + r * cols + c] += torch.randn(8)
    with torch.no_grad():
        delta = (daff(moved, (rows, cols)) - daff(x, (rows, cols))).abs().amax(dim=-1)[0]  # (1 + N,)
    changed = {i for i in range(rows * cols) if delta[1 + i] > 1e-6}
    assert changed == neighbours(r, c, rows, cols)
    assert delta[0] > 1e-6  # the class token is re-scaled by the pooled patch output


def test_daff_class_tokens_skip_the_convs_and_are_rescaled_by_the_squeeze_excitation():
    torch.manual_seed(0)
    daff = DAFF(8, 32, num_prefix=2).eval()  # two class tokens: CLS and DIST
    randomise_norm_stats(daff)
    x = torch.randn(3, 2 + 6, 8)
    with torch.no_grad():
        out = daff(x, (2, 3))
        pooled = out[:, 2:].mean(dim=1)  # (B, D): the squeeze, of DAFF's patch output
        weight = daff.excite.fc2(F.gelu(daff.excite.fc1(pooled)))  # no sigmoid (the code's)
        torch.testing.assert_close(out[:, :2], x[:, :2] * weight[:, None])
        doubled = x.clone()
        doubled[:, :2] *= 2  # the class tokens are not inputs of the patch path
        torch.testing.assert_close(daff(doubled, (2, 3))[:, 2:], out[:, 2:])
    assert daff.excite.fc1.out_features == 2  # reduction 4


def test_daff_patch_path_by_hand():
    """pointwise - BN - GELU, shortcut + (depthwise - BN - GELU), pointwise - BN, on the grid."""
    torch.manual_seed(0)
    daff = DAFF(4, 8, num_prefix=1).eval()
    randomise_norm_stats(daff)
    x = torch.randn(2, 1 + 4, 4)
    grid = x[:, 1:].transpose(1, 2).reshape(2, 4, 2, 2)

    def bn(m, t):
        return (t - m.running_mean[:, None, None]) / torch.sqrt(m.running_var[:, None, None] + m.eps) \
            * m.weight[:, None, None] + m.bias[:, None, None]

    with torch.no_grad():
        h = F.gelu(bn(daff.bn1, torch.einsum("oc,bchw->bohw", daff.conv1.weight[:, :, 0, 0], grid)
                      + daff.conv1.bias[:, None, None]))
        padded = F.pad(h, (1, 1, 1, 1))
        dw = torch.zeros_like(h)
        for i in range(2):
            for j in range(2):
                dw[:, :, i, j] = (padded[:, :, i:i + 3, j:j + 3] * daff.conv2.weight[:, 0]).sum((2, 3))
        h = h + F.gelu(bn(daff.bn2, dw + daff.conv2.bias[:, None, None]))
        h = bn(daff.bn3, torch.einsum("oc,bchw->bohw", daff.conv3.weight[:, :, 0, 0], h)
               + daff.conv3.bias[:, None, None])
        torch.testing.assert_close(daff(x, (2, 2))[:, 1:], h.flatten(2).transpose(1, 2))


# --------------------------------------------------------------------------- HI-MHSA


def test_head_tokens_by_hand():
    torch.manual_seed(0)
    attn = HeadInteractedAttention(8, 2, num_prefix=1)
    with torch.no_grad():
        attn.head_norm.weight.uniform_(0.5, 1.5)
        attn.head_norm.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 5, 8)
    expected = torch.zeros(2, 2, 8)
    with torch.no_grad():
        for i in range(2):
            group = x[:, :, 4 * i: 4 * (i + 1)].mean(dim=1)  # (B, 4): channels of head i, over every token
            token = attn.head_proj(group)  # (B, 8)
            for j in range(2):  # LayerNorm on each 4-channel slice, then GELU
                s = token[:, 4 * j: 4 * (j + 1)]
                s = (s - s.mean(-1, keepdim=True)) / torch.sqrt(s.var(-1, unbiased=False, keepdim=True) + 1e-5)
                expected[:, i, 4 * j: 4 * (j + 1)] = F.gelu(s * attn.head_norm.weight + attn.head_norm.bias)
        expected += attn.head_embed
        torch.testing.assert_close(attn.head_tokens(x), expected)


@pytest.mark.parametrize("num_prefix", [1, 2])
def test_hi_mhsa_is_attention_over_tokens_and_head_tokens_merged_into_the_class_tokens(num_prefix):
    torch.manual_seed(0)
    dim, h, T = 8, 2, 5
    attn = HeadInteractedAttention(dim, h, num_prefix=num_prefix).eval()
    x = torch.randn(2, T, dim)
    with torch.no_grad():
        seq = torch.cat([x, attn.head_tokens(x)], dim=1)  # (B, T + h, D)
        q, k, v = attn.qkv(seq).split(dim, dim=-1)
        out = torch.zeros_like(seq)
        for i in range(h):  # one softmax attention per head, by hand
            sl = slice(4 * i, 4 * (i + 1))
            weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(4), dim=-1)
            out[..., sl] = weights @ v[..., sl]
        out = attn.proj(out)
        expected = out[:, :T].clone()
        expected[:, :num_prefix] += out[:, T:].mean(dim=1, keepdim=True)
        torch.testing.assert_close(attn(x), expected)


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("distilled", [False, True], ids=["dhvt", "dhvt_distilled"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 16), (2, 12, 12), (3, 8, 16)],
                         ids=["1x8x8", "3x16x16", "2x12x12", "3x8x16"])
def test_shapes_for_any_image_size_and_channels(shape, distilled):
    model = tiny(shape, distilled=distilled).eval()
    model.grow(3)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        out, feats = model(x), model.features(x)
        logits, feats1 = model.logits_and_features(x)
    assert out.shape == (2, 3) and feats.shape == (2, 16) and model.feature_dim == 16
    torch.testing.assert_close(logits, out)
    torch.testing.assert_close(feats1, feats)


def test_options_reach_the_blocks_and_there_is_no_position_embedding():
    model = dhvt((3, 16, 16), embed_dim=24, depth=3, num_heads=3, mlp_ratio=2.0, patch_size=4,
                 drop_path_rate=0.2, qkv_bias=False)
    b = model.backbone
    assert len(b.blocks) == 3 and b.blocks[0].attn.num_heads == 3
    assert b.blocks[0].mlp.conv1.out_channels == 48 and b.blocks[0].attn.qkv.bias is None
    assert b.blocks[0].attn.head_embed.shape == (1, 3, 24)  # one learned embedding per head token
    assert [blk.drop_path.drop_prob for blk in b.blocks[1:]] == pytest.approx([0.1, 0.2])
    assert isinstance(b.blocks[0].drop_path, nn.Identity)  # rate 0 in the first block
    names = [n for n, _ in model.named_parameters()]
    assert not any("pos_embed" in n for n in names)  # DHVT drops the absolute position embedding
    assert sum(p.numel() for p in dhvt((3, 32, 32)).backbone.parameters()) == 5_989_350  # DHVT-T (code: same)


def test_grow_keeps_old_rows_and_old_class_outputs():
    model = tiny().eval()
    model.grow(2)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    w = model.head.weight.detach().clone()
    model.grow(5)
    with torch.no_grad():
        after = model(x)
    assert torch.equal(model.head.weight[:2], w) and after.shape == (3, 5)
    torch.testing.assert_close(after[:, :2], before)


@pytest.mark.parametrize("kwargs, key", [
    ({"patch_size": 3}, "model.patch_size"),
    ({"patch_size": 1}, "model.patch_size"),
    ({"embed_dim": 15, "num_heads": 2}, "model.embed_dim"),
    ({"embed_dim": 4, "num_heads": 2, "patch_size": 32}, "model.embed_dim"),  # 4 // 16 channels in SOPE's first conv
    ({"num_heads": 0}, "model.num_heads"),
    ({"depth": 0}, "model.depth"),
    ({"mlp_ratio": 0}, "model.mlp_ratio"),
    ({"drop_path_rate": 1.0}, "model.drop_path_rate"),
])
def test_bad_sizes_are_config_errors(kwargs, key):
    with pytest.raises(ConfigError) as info:
        dhvt((3, 32, 32), **(TINY | kwargs))
    assert info.value.path == key


# --------------------------------------------------------------------------- distilled


def test_distilled_forward_both_and_mean_at_eval_and_train():
    model = tiny(distilled=True)
    assert isinstance(model, DistilledIncrementalClassifier)
    model.grow(4)
    x = torch.randn(3, 3, 8, 8)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with torch.no_grad():
            cls, dist = model.forward_both(x)
            out = model(x)
            tokens = model.backbone.forward_features(x)  # (B, 2 + N, D): [CLS, DIST, patches]
        assert cls.shape == dist.shape == (3, 4) and tokens.shape == (3, 2 + 16, 16)
        torch.testing.assert_close(out, (cls + dist) / 2)
        torch.testing.assert_close(cls, model.head(tokens[:, 0]))
        torch.testing.assert_close(dist, model.head_dist(tokens[:, 1]))
        torch.testing.assert_close(model.features(x), tokens[:, :2].mean(dim=1))
    assert not torch.equal(cls, dist)
    assert all(blk.mlp.num_prefix == 2 and blk.attn.num_prefix == 2 for blk in model.backbone.blocks)


def test_distilled_grow_keeps_both_heads_old_rows():
    model = tiny(distilled=True).eval()
    model.grow(2)
    old = [h.weight.detach().clone() for h in (model.head, model.head_dist)]
    model.grow(3)
    assert model.head.weight.shape == model.head_dist.weight.shape == (3, 16)
    assert torch.equal(model.head.weight[:2], old[0]) and torch.equal(model.head_dist.weight[:2], old[1])


def test_deit_lt_accepts_the_distilled_dhvt_and_refuses_the_plain_one():
    strategy = STRATEGIES.get("deit_lt")()
    strategy.setup(tiny(distilled=True))
    with pytest.raises(ConfigError):
        strategy.setup(tiny())


# --------------------------------------------------------------------------- training


class FrozenTeacher:
    """A stand-in for :class:`clsim.teacher.Teacher`: a fixed tiny frozen MLP per experience."""

    def __init__(self, scenario, tiny_mlp):
        self.scenario, self.tiny_mlp = scenario, tiny_mlp

    def for_experience(self, index: int) -> nn.Module:
        from clsim.teacher import freeze

        model = self.tiny_mlp(self.scenario.input_shape, seed=1234)
        model.grow(self.scenario.seen_classes(index))
        return freeze(model)


def required_models(name: str) -> tuple[str, ...]:
    """The models strategy ``name`` trains (a name, or several once deit_lt lists dhvt_distilled)."""
    required = STRATEGIES.get(name).required_model
    return () if required is None else (required,) if isinstance(required, str) else tuple(required)


TRAINABLE = [n for n in STRATEGIES.names() if not required_models(n) or "deit" in required_models(n)]


def learner_for(name, scenario, tiny_mlp, *, model_seed=0) -> Learner:
    """A DHVT learner as build_learner makes one, 1 epoch on CPU; deit_lt gets the distilled DHVT."""
    strategy = STRATEGIES.get(name)()  # the defaults are a valid configuration
    model = tiny(scenario.input_shape, distilled=name == "deit_lt", seed=model_seed)
    strategy.setup(model)
    engine = Engine(TrainConfig(epochs=1, batch_size=8, lr=1e-2, eval_batch_size=64), seed=0)
    teacher = FrozenTeacher(scenario, tiny_mlp) if getattr(strategy, "uses_teacher", False) else None
    return Learner(scenario, model, strategy, engine, teacher=teacher)


def run_stream(learner, upto=None, state=None) -> RunState:
    state = state or RunState()
    for index in range(state.next_experience, len(learner.scenario) if upto is None else upto):
        train_and_evaluate(learner, index, state)
    return state


def test_only_strategies_with_a_model_of_their_own_are_left_out():
    """gcab (gcab_vit) and the prompting methods (their prompted ViTs) train their own model;
    every strategy that takes any model, and deit_lt, is in TRAINABLE."""
    assert "deit_lt" in TRAINABLE and "finetune" in TRAINABLE
    for name in set(STRATEGIES.names()) - set(TRAINABLE):
        assert required_models(name) and not any(m.startswith("dhvt") for m in required_models(name)), name


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_strategy_trains_dhvt(name, tiny_scenario, tiny_mlp):
    learner = learner_for(name, tiny_scenario, tiny_mlp)
    initial = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    trainable = [n for n, p in learner.model.named_parameters() if p.requires_grad]  # after setup
    state = run_stream(learner)
    assert len(state.losses) == 2 and all(math.isfinite(loss) for loss in state.losses)
    assert all(0.0 <= a <= 1.0 for a in state.rows[1])
    moved = {n for n, p in learner.model.named_parameters()
             if n.startswith("backbone.") and not torch.equal(p, initial[n])}
    # the DHVT parts train (SOPE's convs, DAFF's depthwise conv), unless the strategy froze the
    # backbone (linear_probe): then none of its parameters moves and only the head trains
    dhvt_parts = [n for n in trainable if "patch_embed.proj" in n or ".mlp.conv2." in n]
    if dhvt_parts:
        assert set(dhvt_parts) <= moved
    else:
        assert not moved and learner.model.head.weight.requires_grad
    learner.model.eval()
    x = tiny_scenario.experiences[0].test.get_batch(torch.arange(5))[0]
    with torch.no_grad():
        logits, _ = split_prediction(learner.strategy.predict(learner.model, x))
    assert logits.shape == (5, tiny_scenario.num_classes) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["finetune", "ewc", "lwf", "deit_lt"])
def test_resume_from_a_checkpoint_is_exact(name, tiny_scenario, tiny_mlp):
    a = learner_for(name, tiny_scenario, tiny_mlp)
    state_a = run_stream(a, upto=1)
    buffer = io.BytesIO()
    torch.save({"num_classes": a.model.num_classes, "model": a.model.state_dict(),
                "strategy": a.strategy.state_dict(), "run": state_a}, buffer)
    buffer.seek(0)
    payload = torch.load(buffer, weights_only=False)
    b = learner_for(name, tiny_scenario, tiny_mlp, model_seed=99)  # other initial weights
    b.model.grow(payload["num_classes"])
    b.model.load_state_dict(payload["model"])  # BatchNorm running statistics included
    b.strategy.load_state_dict(payload["strategy"])
    run_stream(a, state=state_a)
    state_b = run_stream(b, state=payload["run"])
    for (key, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(wa, wb), key
    assert state_a.rows == state_b.rows and state_a.losses == state_b.losses


RUN = {
    "name": "dhvt_tiny", "seed": 0,
    "data": {"name": "synthetic", "num_classes": 4, "samples_per_class": 12, "image_size": 8, "channels": 3},
    "scenario": {"name": "class_incremental", "n_tasks": 2},
    "model": {"name": "dhvt", **TINY},
    "strategy": {"name": "finetune"},
    "train": {"epochs": 1, "batch_size": 8, "lr": 0.001},
}


def cli_run(tmp_path, raw: dict, name: str, *extra: str) -> dict:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--out", str(tmp_path / name), "--quiet", *extra]) == 0
    return json.loads((tmp_path / name / "metrics.json").read_text())


@pytest.mark.slow  # 2 s on an idle 2-core machine, 6 s on a busy one; the fast resume tests are above
def test_cli_run_trains_dhvt_and_resume_is_exact(tmp_path, stop_before_experience):
    from conftest import Stopped

    full = cli_run(tmp_path, RUN, "full")
    assert len(full["accuracy_matrix"]) == 2 and all(math.isfinite(x) for x in full["train_loss"])
    undo = stop_before_experience(1)
    with pytest.raises(Stopped):
        cli_run(tmp_path, RUN, "cut")
    undo()
    resumed = cli_run(tmp_path, RUN, "cut", "--resume")
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["train_loss"] == full["train_loss"]


def test_cli_deit_lt_trains_the_distilled_dhvt_student(tmp_path):
    raw = copy.deepcopy(RUN) | {
        "scenario": {"name": "long_tailed_class_incremental", "imbalance_ratio": 4, "n_tasks": 2},
        "model": {"name": "dhvt_distilled", **TINY},
        "strategy": {"name": "deit_lt"},
        "teacher": {"model": {"name": "resnet_cifar", "depth": 8, "width": 4}, "strategy": {"name": "logit_adjust"}},
    }
    raw["data"]["samples_per_class"] = 20
    metrics = run(parse_config(raw), tmp_path / "lt", quiet=True)  # parse_config: where the check is
    assert set(metrics["variants"]) == {"cls", "dist"} and len(metrics["accuracy_matrix"]) == 2


@pytest.mark.slow
def test_federated_fedavg_clients_build_dhvt(tmp_path):
    pytest.importorskip("flwr")
    pytest.importorskip("flwr_datasets")
    from test_federated import tiny as federated_tiny

    raw = federated_tiny(num_clients=2, rounds_per_experience=1, server={"name": "fedavg"})
    raw["model"] = {"name": "dhvt", **TINY}
    raw["strategy"] = {"name": "finetune"}
    metrics = cli_run(tmp_path, raw, "fed")
    R = metrics["accuracy_matrix"]
    assert len(R) == 2 and R[0][1] is None and all(0.0 <= a <= 1.0 for a in R[1])
    assert metrics["communication_bytes"]["up"] > 0
