"""Models from timm: ViTs of any size, ResNets, and any other timm architecture by name.

Weights: ``pretrained: false`` (default), ``pretrained: true`` (timm's hub weights, online
only) or ``pretrained: path/to/weights.{pth,safetensors}`` (a local file, offline). A local
file is read by clsim weights-only (:func:`clsim.engine.checkpoint.load_file`, never pickle) and
handed to timm as a state dict, which timm then adapts (pos-embed resize, head dropped). The
file may also be a clsim run's model (``checkpoints/last.pt``, or its state dict): its backbone
is taken and its growing head dropped. A file that leaves any backbone weight unset is refused
(timm itself only warns and keeps the random weights). A relative path is looked up in the
working directory, next to the config, then one folder up (:mod:`clsim.config.checks`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import sys

import timm
import torch
from torch import nn

from clsim.engine.checkpoint import load_file
from clsim.errors import ConfigError, did_you_mean
from clsim.models.heads import IncrementalClassifier
from clsim.registry import MODELS


def create_backbone(arch: str, pretrained: bool | str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(arch, num_classes=0)`` with clsim's pretrained-weights rules."""
    if not timm.is_model(arch):  # accepts a weights tag: vit_base_patch16_224.augreg_in21k
        hint = did_you_mean(arch, timm.list_models())
        raise ConfigError("model.arch", f"unknown timm architecture '{arch}'{hint}; see timm.list_models()")
    options: dict[str, Any] = {"num_classes": 0, **kwargs}
    state = None
    if isinstance(pretrained, str):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ConfigError("model.pretrained", f"weights file '{path.resolve()}' not found")
        # timm's own file loading is only as safe as the installed timm; clsim reads the file
        # itself, weights-only, and passes timm the tensors (its highest-priority source).
        state = pretrained_state(path)
        options |= {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path), "state_dict": dict(state)}}
    else:
        options["pretrained"] = pretrained
    try:
        backbone = timm.create_model(arch, **options)
    except TypeError as exc:  # timm rejects an option this architecture does not take
        raise ConfigError("model", f"timm '{arch}' rejected the options {sorted(kwargs)}: {exc}")
    except (OSError, RuntimeError) as exc:
        if pretrained is True:
            raise ConfigError("model.pretrained", f"could not fetch hub weights for '{arch}' "
                              f"({type(exc).__name__}); offline, pass a local weights file path")
        if isinstance(pretrained, str):
            raise ConfigError("model.pretrained", f"{pretrained} does not fit timm '{arch}' with these "
                                                  f"options: {str(exc).strip().splitlines()[-1].strip()}") from None
        raise
    backbone.pretrained_cfg.pop("state_dict", None)  # timm keeps its cfg on the model: free the copy
    if state is not None:
        check_covers(backbone, state, pretrained, arch)
    return backbone


def check_covers(backbone: nn.Module, state: dict[str, torch.Tensor], path: str, arch: str) -> None:
    """Every weight of ``backbone`` came from ``state``: timm loads non-strictly when it drops a
    head, so a file with other names (a prefix, another model) would leave random weights."""
    # timm's own key conversion for this architecture (old layouts, pos-embed resize), if it has one
    convert = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    try:
        names = set(convert(dict(state), backbone)) if convert else set(state)
    except (KeyError, RuntimeError, TypeError, ValueError):  # it cannot read this file: names as they are
        names = set(state)
    expected = list(backbone.state_dict())
    missing = [k for k in expected if k not in names]
    if missing:
        raise ConfigError("model.pretrained", f"{path} does not fit timm '{arch}': {len(missing)} of its "
                                              f"{len(expected)} weights are not in the file (e.g. '{missing[0]}'; "
                                              f"the file has e.g. '{next(iter(state), '')}')")


def pretrained_state(path: Path) -> dict[str, Any]:
    """The state dict in a local weights file, read weights-only (``.pth``/``.pt``/``.safetensors``).

    Like timm's ``load_state_dict``: a training checkpoint's ``state_dict_ema``/``model_ema``/
    ``state_dict``/``model`` entry, with ``module.`` prefixes (DataParallel) removed. A file that
    needs pickle is refused with a one-line :class:`ConfigError` saying how to convert it.
    """
    state = load_file(path, key="model.pretrained")
    if isinstance(state, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError("model.pretrained", f"{path} holds no state dict of tensors "
                                              f"(save one with torch.save(model.state_dict(), FILE))")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # a clsim model: IncrementalClassifier (backbone.*, head.*) or a prompted ViT (backbone.vit.*)
    for prefix in ("backbone.vit.", "backbone."):
        if any(k.startswith(prefix) for k in state):
            return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return state


def _default_patch(image_size: int) -> int:
    """The largest of 16, 8, 4, 2 leaving an 8x8 grid of patches, else a 4x4 grid.

    224 px -> 16 (ViT-B/16), 64 px -> 8, 32 px -> 4 (the usual CIFAR ViT), 8 px -> 2.
    """
    for min_grid in (8, 4):
        patch = next((p for p in (16, 8, 4, 2) if image_size // p >= min_grid), None)
        if patch:
            return patch
    return 1


def vit_options(
    input_shape: tuple[int, int, int], /, *,
    patch_size: int | None, embed_dim: int | None, depth: int | None,
    num_heads: int | None, mlp_ratio: float | None, drop_path_rate: float,
) -> dict[str, Any]:
    """``create_backbone`` options that size a timm ViT (or DeiT) for ``(C, H, W)`` images.

    ``None`` keeps the architecture's value; the patch defaults to :func:`_default_patch`.
    Raises :class:`ConfigError` when the heads do not divide the width or the patch the image.
    """
    channels, height, _ = input_shape
    overrides = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio}
    if embed_dim is not None and num_heads is not None and embed_dim % num_heads:
        raise ConfigError("model.num_heads", f"expected a divisor of embed_dim {embed_dim}, got {num_heads}")
    patch = patch_size or _default_patch(height)
    if height % patch:
        raise ConfigError("model.patch_size", f"expected a divisor of the image size {height}, got {patch}")
    return {"img_size": height, "patch_size": patch, "in_chans": channels, "drop_path_rate": drop_path_rate,
            **{k: v for k, v in overrides.items() if v is not None}}


@MODELS.register("vit")
def vit(
    input_shape: tuple[int, int, int], /, *,
    arch: str = "vit_tiny_patch16_224",
    patch_size: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float | None = None,
    drop_path_rate: float = 0.0,
    global_pool: Literal["token", "avg"] = "token",
    pretrained: bool | str = False,
) -> IncrementalClassifier:
    """A Vision Transformer from timm sized for the data (8x8 digits to 224 px ImageNet).

    Args:
        arch: timm ViT architecture whose defaults the other keys override.
        patch_size: patch side; default 16 at 224 px, 4 at 32 px, 2 at 8 px (see _default_patch).
        embed_dim: token width (default: the architecture's).
        depth: number of transformer blocks (default: the architecture's).
        num_heads: attention heads (default: the architecture's).
        mlp_ratio: MLP hidden width / embed_dim (default: the architecture's).
        drop_path_rate: stochastic depth rate.
        global_pool: 'token' (the CLS token) or 'avg' (mean of patch tokens, no CLS token).
        pretrained: false, true (hub, online) or a local weights file.
    """
    sizing = vit_options(input_shape, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate)
    backbone = create_backbone(arch, pretrained, global_pool=global_pool,
                               class_token=global_pool == "token", **sizing)
    return IncrementalClassifier(backbone, backbone.num_features, pretrained=pretrained is not False)


@MODELS.register("resnet")
def resnet(
    input_shape: tuple[int, int, int], /, *,
    arch: str = "resnet18",
    small_input: bool | None = None,
    pretrained: bool | str = False,
) -> IncrementalClassifier:
    """A ResNet from timm; small inputs get the CIFAR stem (3x3 stride-1 conv, no max-pool).

    Args:
        arch: timm ResNet variant (resnet18, resnet34, resnet50, ...).
        small_input: use the CIFAR stem; default: when the images are 64 px or smaller.
        pretrained: false, true (hub, online) or a local weights file.
    """
    channels, height, _ = input_shape
    backbone = create_backbone(arch, pretrained, in_chans=channels)
    if small_input if small_input is not None else height <= 64:
        # He et al. 2016, Sec. 4.2: small images lose too much to a 7x7/2 conv + max-pool.
        if isinstance(backbone.conv1, nn.Conv2d):
            stem_out = backbone.conv1.out_channels
            backbone.conv1 = nn.Conv2d(channels, stem_out, 3, stride=1, padding=1, bias=False)
        else:  # deep stem (resnet*d, resnet*t): three 3x3 convs, only the first strided
            backbone.conv1[0].stride = (1, 1)
        backbone.maxpool = nn.Identity()
    return IncrementalClassifier(backbone, backbone.num_features, pretrained=pretrained is not False)


@MODELS.register("timm")
def timm_model(
    input_shape: tuple[int, int, int], /, *,
    arch: str,
    pretrained: bool | str = False,
    options: dict = {},
) -> IncrementalClassifier:
    """Any timm architecture by name, with extra ``timm.create_model`` options.

    Args:
        arch: timm architecture name (see ``timm.list_models()``).
        pretrained: false, true (hub, online) or a local weights file.
        options: extra keyword arguments for ``timm.create_model`` (e.g. img_size).
    """
    backbone = create_backbone(arch, pretrained, in_chans=input_shape[0], **options)
    return IncrementalClassifier(backbone, backbone.num_features, pretrained=pretrained is not False)
