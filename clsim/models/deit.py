"""DeiT with a distillation token: a ViT with a CLS and a DIST token and one growing head on each.

Touvron et al. 2021, "Training data-efficient image transformers & distillation through
attention" (ICML): a second learned token (DIST) joins the CLS token at the start of the
sequence, goes through the same blocks, and gets its own linear head. In training the CLS head
learns from the labels and the DIST head from a teacher (Sec. 4, hard-label distillation); at
inference the two heads' logits are averaged (the official code and timm's forward_head).
DeiT-LT (Rangwani et al. 2024) trains the DIST head from a CNN teacher on out-of-distribution
augmented images; that strategy reads :meth:`DistilledIncrementalClassifier.forward_both`.

The backbone is timm's ``VisionTransformerDistilled`` (``deit_*_distilled_*``) built headless
(``num_classes=0``); the two heads live here, so they grow with the classes like every clsim head.
"""

from __future__ import annotations

import copy

import torch
from timm.models.deit import VisionTransformerDistilled

from clsim.errors import ConfigError
from clsim.models.heads import IncrementalClassifier, grow_linear
from clsim.models.timm_models import create_backbone, vit_options
from clsim.registry import MODELS


class DistilledIncrementalClassifier(IncrementalClassifier):
    """A distilled ViT with two growing heads: ``head`` on the CLS token, ``head_dist`` on DIST.

    ``forward`` is always (train and eval) the mean of the two heads' logits, DeiT's inference
    rule, so every generic strategy sees a plain ``(B, num_classes)`` tensor; strategies that
    train the two heads apart (DeiT, DeiT-LT) call :meth:`forward_both`.

    Args:
        backbone: timm ``VisionTransformerDistilled`` with ``num_classes=0`` (no timm heads).
        num_classes: initial size of both heads (0 until the first experience grows them).
    """

    def __init__(self, backbone: VisionTransformerDistilled, *, num_classes: int = 0, pretrained: bool = False):
        super().__init__(backbone, backbone.num_features, num_classes=0, pretrained=pretrained)
        self.head_dist = copy.deepcopy(self.head)  # (0, D): empty like `head`, then both grow
        self.grow(num_classes)

    def token_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cls, dist)`` token features after the final norm, each ``(B, D)``.

        As timm's ``forward_features`` + ``forward_head(pre_logits)``: the sequence is
        ``[CLS, DIST, patches...]``; position 0 is CLS and position 1 is DIST.
        """
        tokens = self.backbone.forward_features(x)  # (B, 2 + N, D)
        drop = self.backbone.head_drop  # dropout before the heads (identity at drop_rate 0)
        return drop(tokens[:, 0]), drop(tokens[:, 1])  # (B, D), (B, D)

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cls_logits, dist_logits)``, each ``(B, num_classes)``: the DeiT training output."""
        cls, dist = self.token_features(x)
        return self.head(cls), self.head_dist(dist)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_logits, dist_logits = self.forward_both(x)
        return (cls_logits + dist_logits) / 2  # (B, num_classes): DeiT's inference rule

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the CLS and DIST token features, ``(B, D)`` (timm's ``pre_logits``)."""
        cls, dist = self.token_features(x)
        return (cls + dist) / 2

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(x), features(x))`` from one pass through the backbone.

        Here ``head(features(x)) != forward(x)`` (two heads on two tokens), so a strategy that
        needs both logits and features must not rebuild the logits from the features.
        """
        cls, dist = self.token_features(x)
        logits = (self.head(cls) + self.head_dist(dist)) / 2  # (B, num_classes)
        return logits, (cls + dist) / 2  # (B, num_classes), (B, D)

    def grow(self, num_classes: int) -> None:
        """Widen both heads to ``num_classes`` outputs, keeping their old rows' weights."""
        super().grow(num_classes)  # `head`
        self.head_dist = grow_linear(self.head_dist, num_classes)


@MODELS.register("deit")
def deit(
    input_shape: tuple[int, int, int], /, *,
    arch: str = "deit_tiny_distilled_patch16_224",
    patch_size: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float | None = None,
    drop_path_rate: float = 0.0,
    pretrained: bool | str = False,
) -> DistilledIncrementalClassifier:
    """A distilled DeiT from timm (CLS + DIST tokens, two growing heads) sized for the data.

    Args:
        arch: timm distilled DeiT architecture (deit_{tiny,small,base}_distilled_patch16_224, ...)
            whose defaults the other keys override.
        patch_size: patch side; default 16 at 224 px, 4 at 32 px, 2 at 8 px (as for vit).
        embed_dim: token width (default: the architecture's).
        depth: number of transformer blocks (default: the architecture's).
        num_heads: attention heads (default: the architecture's).
        mlp_ratio: MLP hidden width / embed_dim (default: the architecture's).
        drop_path_rate: stochastic depth rate.
        pretrained: false, true (hub, online) or a local weights file (timm's heads are dropped).
    """
    sizing = vit_options(input_shape, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate)
    backbone = create_backbone(arch, pretrained, **sizing)
    if not isinstance(backbone, VisionTransformerDistilled):
        raise ConfigError("model.arch", f"expected a distilled DeiT (e.g. deit_tiny_distilled_patch16_224), "
                          f"got '{arch}' ({type(backbone).__name__}, no distillation token)")
    return DistilledIncrementalClassifier(backbone, pretrained=pretrained is not False)
