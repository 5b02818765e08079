"""Models: every registered model on tiny inputs; growing heads; timm weights from a local file."""

from __future__ import annotations


import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from clsim.errors import ConfigError
from clsim.models.heads import IncrementalClassifier
from clsim.models.timm_models import resnet, timm_model, vit
from clsim.registry import MODELS

# Tiny settings per registered model; a model added later gets {} (its defaults) and so at
# least this smoke test. A model whose defaults are too slow here belongs in this table.
TINY: dict[str, dict] = {
    "mlp": {"hidden": [16]},
    "cnn": {"channels": [4, 8], "hidden": 16},
    "vit": {"embed_dim": 16, "depth": 1, "num_heads": 2},
    "deit": {"embed_dim": 16, "depth": 1, "num_heads": 2},
    "dhvt": {"embed_dim": 16, "depth": 1, "num_heads": 2},
    "dhvt_distilled": {"embed_dim": 16, "depth": 1, "num_heads": 2},
    "l2p_vit": {"embed_dim": 16, "depth": 1, "num_heads": 2},
    "dualprompt_vit": {"embed_dim": 16, "depth": 1, "num_heads": 2},
    "coda_prompt_vit": {"embed_dim": 16, "depth": 1, "num_heads": 2},
    "resnet": {},  # resnet18, the default: ~0.1 s to build
    "timm": {"arch": "test_efficientnet"},  # timm's own 100k-parameter test model
}
SHAPES = [(1, 8, 8), (3, 32, 32)]

pytestmark = pytest.mark.usefixtures("single_thread")


def build(name: str, shape: tuple[int, int, int], **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return MODELS.get(name)(shape, **(TINY.get(name, {}) | kwargs))




# --------------------------------------------------------------------------- every model


@pytest.mark.parametrize("shape", SHAPES, ids=["1x8x8", "3x32x32"])
@pytest.mark.parametrize("name", MODELS.names())
def test_model_forward_features_and_grow(name, shape):
    model = build(name, shape).eval()
    assert model.num_classes == 0  # no class until the first experience grows the head
    model.grow(3)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        out, feats = model(x), model.features(x)
    assert out.shape == (2, 3) and model.num_classes == 3
    assert feats.shape == (2, model.feature_dim)
    logits, feats1 = model.logits_and_features(x)  # one pass: forward and features agree
    torch.testing.assert_close(logits, out)
    torch.testing.assert_close(feats1, feats)

    old_w, old_b = model.head.weight.detach().clone(), model.head.bias.detach().clone()
    model.grow(5)
    with torch.no_grad():
        out5 = model(x)
    assert out5.shape == (2, 5) and model.num_classes == 5
    assert torch.equal(model.head.weight[:3], old_w) and torch.equal(model.head.bias[:3], old_b)
    torch.testing.assert_close(out5[:, :3], out, rtol=1e-5, atol=1e-6)  # old classes unchanged
    assert model.head.weight.requires_grad  # the new head trains

    head = model.head
    model.grow(5)
    assert model.head is head  # same size: nothing to do
    with pytest.raises(ValueError, match="shrink"):
        model.grow(4)
    assert model.num_classes == 5


@pytest.mark.parametrize("name", MODELS.names())
def test_model_every_parameter_gets_a_gradient(name):
    model = build(name, (1, 8, 8)).train()
    model.grow(3)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    if hasattr(model, "logits_and_losses"):  # prompt keys learn from the matching loss only
        logits, extra = model.logits_and_losses(x, train=True)
        loss = F.cross_entropy(logits, y) + sum(extra.values())
    else:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters outside the graph: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_grow_keeps_device_and_dtype():
    model = build("mlp", (1, 4, 4)).double()
    model.grow(2)
    model.grow(4)
    assert model.head.weight.dtype == torch.float64
    assert model(torch.randn(3, 1, 4, 4, dtype=torch.float64)).shape == (3, 4)


# --------------------------------------------------------------------------- ViT


@pytest.mark.parametrize("size, patch", [(8, 2), (16, 2), (32, 4), (64, 8), (224, 16)])
def test_vit_default_patch_leaves_an_8x8_grid_where_possible(size, patch):
    model = vit((3, size, size), **TINY["vit"])
    embed = model.backbone.patch_embed
    assert embed.proj.kernel_size == (patch, patch)
    min_grid = 8 if size >= 16 else 4
    assert min(embed.grid_size) >= min_grid
    # the largest such patch of 16, 8, 4, 2: twice the patch would leave a smaller grid
    assert patch == 16 or size // (2 * patch) < min_grid


def test_vit_options_reach_timm():
    model = vit((1, 8, 8), embed_dim=24, depth=2, num_heads=3, mlp_ratio=2.0, global_pool="avg")
    b = model.backbone
    assert model.feature_dim == 24 and len(b.blocks) == 2 and b.blocks[0].attn.num_heads == 3
    assert b.blocks[0].mlp.fc1.out_features == 48
    assert b.cls_token is None  # 'avg' pools patch tokens, no CLS token
    model.grow(2)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 2)


@pytest.mark.parametrize("kwargs, key", [
    ({"patch_size": 3}, "model.patch_size"),           # 8 px is not a multiple of 3
    ({"embed_dim": 16, "num_heads": 3}, "model.num_heads"),
])
def test_vit_rejects_inconsistent_sizes(kwargs, key):
    with pytest.raises(ConfigError) as info:
        vit((1, 8, 8), **({"depth": 1} | kwargs))
    assert info.value.path == key


@pytest.mark.parametrize("shape, suffix, head", [
    ((1, 8, 8), ".pth", 0),               # a headless backbone
    ((3, 32, 32), ".pth", 1000),          # timm's default 1000-class head is dropped on load
    ((3, 8, 8), ".safetensors", 0),
])
def test_vit_loads_pretrained_weights_from_a_local_file(shape, suffix, head, tmp_path, no_network):
    channels, size, _ = shape
    patch = {8: 2, 32: 4}[size]
    torch.manual_seed(1)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=head, img_size=size, patch_size=patch,
                            in_chans=channels, **TINY["vit"])
    saved = ref.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in saved.items()}, str(path))
    else:
        torch.save(saved, path)

    torch.manual_seed(2)
    model = vit(shape, **TINY["vit"], pretrained=str(path))
    loaded = model.backbone.state_dict()
    expected = {k: v for k, v in saved.items() if not k.startswith("head.")}
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    # and without the file the same seed gives other weights: the equality above is the load
    torch.manual_seed(2)
    fresh = vit(shape, **TINY["vit"]).backbone.state_dict()
    assert not torch.equal(fresh["pos_embed"], expected["pos_embed"])


@pytest.mark.parametrize("target", ["vit", "l2p_vit", "dualprompt_vit", "coda_prompt_vit"])
@pytest.mark.parametrize("layout", ["state_dict", "checkpoint"])
def test_a_clsim_models_file_pretrains_the_vit_and_the_prompt_models(target, layout, tmp_path, no_network):
    """A clsim run's model (backbone.*, a grown head.*) is a pretrained file for any ViT model."""
    torch.manual_seed(1)
    source = vit((3, 8, 8), **TINY["vit"])
    source.grow(5)
    state = source.state_dict()
    path = tmp_path / "last.pt"
    torch.save(state if layout == "state_dict" else {"run": {}, "model": state}, path)
    torch.manual_seed(2)
    model = MODELS.get(target)((3, 8, 8), **TINY["vit"], pretrained=str(path))
    vit_part = model.backbone.vit if target != "vit" else model.backbone
    loaded = vit_part.state_dict()
    expected = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    assert set(loaded) == set(expected) and model.pretrained
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    # and the prompted model's file works the same way (its backbone.vit.* weights)
    if target != "vit":
        again = tmp_path / "prompted.pt"
        torch.save(model.state_dict(), again)
        reloaded = MODELS.get(target)((3, 8, 8), **TINY["vit"], pretrained=str(again)).backbone.vit.state_dict()
        assert all(torch.equal(reloaded[k], v) for k, v in expected.items())


def test_a_file_that_leaves_weights_unset_is_a_config_error(tmp_path, no_network):
    """timm loads non-strictly once it drops a head: clsim refuses what would stay random."""
    saved = vit((3, 8, 8), **TINY["vit"]).backbone.state_dict()
    partial, renamed = tmp_path / "partial.pth", tmp_path / "renamed.pth"
    torch.save({k: v for k, v in saved.items() if not k.startswith("blocks.0.mlp")}, partial)
    torch.save({f"encoder.{k}": v for k, v in saved.items()}, renamed)
    for path, named in ((partial, "blocks.0.mlp"), (renamed, "encoder.")):
        with pytest.raises(ConfigError) as info:
            vit((3, 8, 8), **TINY["vit"], pretrained=str(path))
        assert info.value.path == "model.pretrained" and path.name in str(info.value) and named in str(info.value)


@pytest.mark.parametrize("factory, kwargs", [
    (vit, TINY["vit"]), (resnet, {}), (timm_model, TINY["timm"]),
])
def test_missing_weights_file_is_a_config_error(factory, kwargs, tmp_path, no_network):
    with pytest.raises(ConfigError) as info:
        factory((3, 8, 8), **kwargs, pretrained=str(tmp_path / "nope.pth"))
    assert info.value.path == "model.pretrained" and "nope.pth" in str(info.value)


@pytest.mark.parametrize("factory, kwargs", [
    (vit, TINY["vit"]), (resnet, {}), (timm_model, TINY["timm"]),
])
def test_hub_weights_offline_are_a_config_error(factory, kwargs, no_network):
    with pytest.raises(ConfigError) as info:
        factory((3, 8, 8), **kwargs, pretrained=True)
    assert info.value.path == "model.pretrained" and "local weights file" in str(info.value)


@pytest.mark.parametrize("factory, arch, kwargs", [
    (vit, "vit_tiny_patch16_224.augreg_in21k", TINY["vit"]),
    (resnet, "resnet18.a1_in1k", {}),
])
def test_arch_with_a_pretrained_tag_is_accepted(factory, arch, kwargs, no_network):
    model = factory((3, 8, 8), arch=arch, **kwargs)  # the tag picks hub weights; none loaded here
    assert model.backbone.pretrained_cfg["tag"] == arch.split(".")[1]


@pytest.mark.parametrize("factory", [vit, resnet, timm_model])
def test_unknown_arch_is_a_config_error(factory):
    with pytest.raises(ConfigError) as info:
        factory((3, 8, 8), arch="vit_tinny_patch16_224")
    assert info.value.path == "model.arch"


# --------------------------------------------------------------------------- ResNet


def stem_conv(model: IncrementalClassifier) -> nn.Conv2d:
    """The first convolution the image meets."""
    return next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("arch", [
    "resnet18",
    "resnet18d",
])
def test_resnet_small_input_uses_the_cifar_stem(arch):
    model = resnet((1, 32, 32), arch=arch)
    conv = stem_conv(model)
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.in_channels == 1
    assert isinstance(model.backbone.maxpool, nn.Identity)
    model.eval().grow(2)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 2)


@pytest.mark.parametrize("shape, small_input", [((3, 32, 32), False), ((3, 96, 96), None)])
def test_resnet_large_input_keeps_the_imagenet_stem(shape, small_input):
    model = resnet(shape, small_input=small_input)
    conv = stem_conv(model)
    assert conv.kernel_size == (7, 7) and conv.stride == (2, 2)
    assert isinstance(model.backbone.maxpool, nn.MaxPool2d)


def test_resnet_small_input_can_be_forced_on_large_images():
    conv = stem_conv(resnet((3, 96, 96), small_input=True))
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1)
