"""GCAB + CFDC against the public code: the paper's projector, BCE by default, GCAB alone reads no projector."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clsim.errors import ConfigError
from clsim.models.gcab import DriftProjector, PaperDriftProjector, gcab_vit
from clsim.strategies.gcab import GatedClassAttention, GatedClassAttentionOnly

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {"embed_dim": 8, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}


def code_layout_projector(p: PaperDriftProjector, x: torch.Tensor) -> torch.Tensor:
    """The public code's computation: tokens as (B, D, 1, N), 1x1 conv, LayerNorm([D, 1, N]), ReLU, 1x1 conv."""
    B, N, D = x.shape
    h = x.permute(0, 2, 1).unsqueeze(2)  # (B, D, 1, N)
    h = F.conv2d(h, p.fc1.weight[:, :, None, None], p.fc1.bias)
    h = F.layer_norm(h, (D, 1, N), p.norm.weight.t().unsqueeze(1), p.norm.bias.t().unsqueeze(1), p.norm.eps)
    h = F.conv2d(F.relu(h), p.fc2.weight[:, :, None, None], p.fc2.bias)
    return h.squeeze(2).permute(0, 2, 1)  # (B, N, D)


def test_paper_projector_is_the_codes_conv_norm_relu_conv():
    torch.manual_seed(0)
    p = PaperDriftProjector(6, 5)
    with torch.no_grad():  # a non-trivial affine norm, so its (N, D) layout is checked too
        p.norm.weight.normal_()
        p.norm.bias.normal_()
    x = torch.randn(3, 5, 6)
    torch.testing.assert_close(p(x), code_layout_projector(p, x))


def test_paper_projector_has_no_residual_and_is_not_zero_initialised():
    torch.manual_seed(0)
    p = PaperDriftProjector(6, 5)
    assert p.fc2.weight.abs().sum() > 0  # PyTorch's default init, as the code's convs
    with torch.no_grad():
        p.fc2.weight.zero_()
        p.fc2.bias.fill_(0.5)
    assert torch.equal(p(torch.randn(2, 5, 6)), torch.full((2, 5, 6), 0.5))  # no x + ...
    r = DriftProjector(6)
    x = torch.randn(2, 5, 6)
    assert torch.equal(r(x), x)  # the residual one starts as the identity


@pytest.mark.parametrize("kind, cls", [("paper", PaperDriftProjector), ("residual", DriftProjector)])
def test_model_grows_projectors_of_the_chosen_kind(kind, cls):
    model = gcab_vit((1, 8, 8), projector=kind, **TINY)
    for total in (2, 4, 6):
        model.grow(total)
    assert len(model.projectors) == 2 and all(type(p) is cls for p in model.projectors)
    if kind == "paper":
        assert model.projectors[0].norm.weight.shape == (16, 8)  # (tokens, D): 4 x 4 patches of 2 px
    assert model.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 6)


def test_unknown_projector_is_a_config_error():
    with pytest.raises(ConfigError, match="^model.projector: expected one of residual, paper"):
        gcab_vit((1, 8, 8), projector="mlp", **TINY)


def test_bce_is_the_default_loss_of_both_strategies():
    assert GatedClassAttention().bce and GatedClassAttentionOnly().bce


@torch.no_grad()
def test_gcab_alone_never_reads_a_projector_and_cfdc_does():
    torch.manual_seed(0)
    model = gcab_vit((1, 8, 8), projector="paper", **TINY).eval()
    model.grow(2)
    model.grow(4)
    x = torch.randn(3, 1, 8, 8)
    gcab, cfdc = GatedClassAttentionOnly(), GatedClassAttention()
    before_gcab, (before_cfdc, _) = gcab.predict(model, x), cfdc.predict(model, x)
    torch.testing.assert_close(before_cfdc, model(x))
    p = model.projectors[0].fc2.weight  # a random change: a constant shift the block's LayerNorm removes
    p.add_(torch.randn_like(p))
    assert torch.equal(gcab.predict(model, x), before_gcab)  # no projector in GCAB's inference
    assert not torch.equal(cfdc.predict(model, x)[0][:, :2], before_cfdc[:, :2])  # task 0 reads P_1
