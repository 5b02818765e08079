"""DeiT with a distillation token: two tokens, two growing heads, mean-of-heads forward, local weights."""

from __future__ import annotations


import pytest
import timm
import torch
import torch.nn.functional as F

from clsim.errors import ConfigError
from clsim.models.deit import DistilledIncrementalClassifier, deit

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {"embed_dim": 16, "depth": 2, "num_heads": 2}
SHAPE = (3, 16, 16)  # patch 2 (default): an 8x8 grid, 2 + 64 tokens


def tiny(num_classes: int = 3, *, shape=SHAPE, seed: int = 0, **kwargs) -> DistilledIncrementalClassifier:
    torch.manual_seed(seed)
    model = deit(shape, **(TINY | kwargs))
    model.grow(num_classes)
    return model


def batch(n: int = 4, *, shape=SHAPE, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))




# --------------------------------------------------------------------------- outputs


def test_forward_both_shapes_and_forward_is_their_mean_in_train_and_eval():
    model, x = tiny(3), batch()
    assert model.num_classes == 3 and model.feature_dim == 16
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            cls_logits, dist_logits = model.forward_both(x)
            out = model(x)
        assert cls_logits.shape == dist_logits.shape == out.shape == (4, 3)
        torch.testing.assert_close(out, (cls_logits + dist_logits) / 2)
        assert not torch.allclose(cls_logits, dist_logits)  # two heads on two tokens


def test_features_are_the_mean_of_the_two_token_features():
    model, x = tiny(3).eval(), batch()
    with torch.no_grad():
        cls, dist = model.token_features(x)
        feats = model.features(x)
        logits, feats1 = model.logits_and_features(x)
        out = model(x)
    assert cls.shape == dist.shape == feats.shape == (4, model.feature_dim)
    torch.testing.assert_close(feats, (cls + dist) / 2)
    # timm's own pre-logits output of VisionTransformerDistilled is the same mean
    torch.testing.assert_close(feats, model.backbone.forward_head(model.backbone.forward_features(x),
                                                                  pre_logits=True))
    torch.testing.assert_close(logits, out)
    torch.testing.assert_close(feats1, feats)
    torch.testing.assert_close(model.head(cls), model.forward_both(x)[0])


# --------------------------------------------------------------------------- two heads


def test_the_two_heads_are_distinct_parameters_and_both_train():
    model, x, y = tiny(3).train(), batch(), torch.tensor([0, 1, 2, 0])
    assert model.head is not model.head_dist
    assert model.head.weight.data_ptr() != model.head_dist.weight.data_ptr()
    assert not torch.equal(model.head.weight, model.head_dist.weight)  # initialized apart
    cls_logits, dist_logits = model.forward_both(x)
    (F.cross_entropy(cls_logits, y) + F.cross_entropy(dist_logits, y)).backward()
    for p in (model.head.weight, model.head.bias, model.head_dist.weight, model.head_dist.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("which", [0, 1])
def test_a_loss_on_one_head_reaches_that_head_only(which):
    model, x, y = tiny(3).train(), batch(), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(model.forward_both(x)[which], y).backward()
    used, unused = (model.head, model.head_dist) if which == 0 else (model.head_dist, model.head)
    assert used.weight.grad is not None and used.weight.grad.abs().sum() > 0
    assert unused.weight.grad is None
    # both tokens feed either head: they attend to each other in every block
    assert model.backbone.cls_token.grad.abs().sum() > 0
    assert model.backbone.dist_token.grad.abs().sum() > 0


def test_grow_keeps_both_heads_old_rows_and_old_class_outputs():
    model, x = tiny(3).eval(), batch()
    with torch.no_grad():
        cls3, dist3 = model.forward_both(x)
        out3 = model(x)
    old = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("head")}
    model.grow(5)
    assert model.head.out_features == model.head_dist.out_features == model.num_classes == 5
    for name, value in old.items():
        assert torch.equal(model.get_parameter(name)[:3], value), name
    assert model.head is not model.head_dist
    assert model.head.weight.requires_grad and model.head_dist.weight.requires_grad
    with torch.no_grad():
        cls5, dist5 = model.forward_both(x)
        out5 = model(x)
    assert cls5.shape == dist5.shape == out5.shape == (4, 5)
    for before, after in ((cls3, cls5), (dist3, dist5), (out3, out5)):
        torch.testing.assert_close(after[:, :3], before, rtol=1e-5, atol=1e-6)
    head = model.head_dist
    model.grow(5)
    assert model.head_dist is head  # same size: nothing to do
    with pytest.raises(ValueError, match="shrink"):
        model.grow(4)


def test_heads_grow_from_an_initial_size():
    torch.manual_seed(0)
    model = DistilledIncrementalClassifier(deit(SHAPE, **TINY).backbone, num_classes=2)
    assert model.head.out_features == model.head_dist.out_features == 2
    assert model(batch()).shape == (4, 2)


# --------------------------------------------------------------------------- the DIST token


def test_the_dist_token_is_a_second_prefix_token():
    backbone = tiny(3).backbone
    assert backbone.num_prefix_tokens == 2
    assert backbone.dist_token.shape == backbone.cls_token.shape == (1, 1, 16)
    assert backbone.pos_embed.shape == (1, 2 + 64, 16)  # CLS, DIST, 8x8 patches
    assert not torch.equal(backbone.dist_token, backbone.cls_token)


def test_swapping_the_two_tokens_swaps_their_features():
    """Attention treats tokens alike: CLS and DIST differ only by their embeddings.

    Exchanging the two learned tokens and their position embeddings exchanges the two outputs,
    so the DIST feature is read from the DIST token's own position and nowhere else.
    """
    model, x = tiny(3).eval(), batch()
    with torch.no_grad():
        cls, dist = model.token_features(x)
        b = model.backbone
        b.cls_token.data, b.dist_token.data = b.dist_token.data.clone(), b.cls_token.data.clone()
        b.pos_embed.data[:, [0, 1]] = b.pos_embed.data[:, [1, 0]]
        cls_swapped, dist_swapped = model.token_features(x)
    torch.testing.assert_close(cls_swapped, dist, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dist_swapped, cls, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cls, dist)


def test_changing_the_dist_token_moves_both_tokens_but_not_the_heads():
    model, x = tiny(3).eval(), batch()
    with torch.no_grad():
        cls, dist = model.token_features(x)
        model.backbone.dist_token.add_(torch.randn_like(model.backbone.dist_token))
        cls2, dist2 = model.token_features(x)
    assert not torch.allclose(dist2, dist)
    assert not torch.allclose(cls2, cls)  # the CLS token attends to the DIST token
    assert all(torch.isfinite(t).all() for t in (cls2, dist2))


# --------------------------------------------------------------------------- factory


def test_options_reach_timm():
    model = deit((1, 8, 8), embed_dim=24, depth=3, num_heads=3, mlp_ratio=2.0)
    b = model.backbone
    assert model.feature_dim == 24 and len(b.blocks) == 3 and b.blocks[0].attn.num_heads == 3
    assert b.blocks[0].mlp.fc1.out_features == 48 and b.patch_embed.proj.kernel_size == (2, 2)
    assert b.patch_embed.proj.in_channels == 1
    assert not any(p.numel() for p in b.head.parameters())  # timm's heads are not used
    assert not any(p.numel() for p in b.head_dist.parameters())


@pytest.mark.parametrize("kwargs, key", [
    ({"patch_size": 3}, "model.patch_size"),
    ({"embed_dim": 16, "num_heads": 3}, "model.num_heads"),
    ({"arch": "vit_tiny_patch16_224", "embed_dim": 16, "num_heads": 2}, "model.arch"),  # no DIST token
    ({"arch": "deit_tinny_distilled_patch16_224"}, "model.arch"),
])
def test_inconsistent_options_are_config_errors(kwargs, key):
    with pytest.raises(ConfigError) as info:
        deit((1, 8, 8), **({"depth": 1} | kwargs))
    assert info.value.path == key


@pytest.mark.parametrize("head", [0, 10])  # a headless file, or one with timm's two heads (dropped)
def test_loads_pretrained_weights_from_a_local_file(head, tmp_path, no_network):
    torch.manual_seed(1)
    ref = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=head, img_size=16, patch_size=2,
                            in_chans=3, **TINY)
    saved = ref.state_dict()
    path = tmp_path / "deit.pth"
    torch.save(saved, path)

    torch.manual_seed(2)
    model = deit(SHAPE, **TINY, pretrained=str(path))
    loaded = model.backbone.state_dict()
    expected = {k: v for k, v in saved.items() if not k.startswith("head")}
    assert "dist_token" in expected and set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    torch.manual_seed(2)
    fresh = deit(SHAPE, **TINY).backbone.state_dict()
    assert not torch.equal(fresh["dist_token"], expected["dist_token"])  # the equality is the load
    assert model.num_classes == 0


def test_missing_weights_file_is_a_config_error(tmp_path, no_network):
    with pytest.raises(ConfigError) as info:
        deit(SHAPE, **TINY, pretrained=str(tmp_path / "nope.pth"))
    assert info.value.path == "model.pretrained"
