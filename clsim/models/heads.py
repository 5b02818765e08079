"""The model contract every learner follows: a backbone and a classifier head that grows."""

from __future__ import annotations

import warnings

import torch
from torch import nn


class IncrementalClassifier(nn.Module):
    """A feature extractor followed by a linear head that grows as new classes arrive.

    The head only ever has outputs for the classes seen so far, so logits of unseen classes
    are masked by construction (the usual class-incremental practice, as in Avalanche's
    ``IncrementalClassifier``): prediction is always among all seen classes, with no task id.

    Args:
        backbone: maps ``(B, C, H, W)`` images to ``(B, feature_dim)`` features.
        feature_dim: width of the backbone's output.
        num_classes: initial head size (0 until the first experience grows it).
        pretrained: the backbone starts from pretrained weights (L2 / EWC then anchor at them
            during the first task, as "A Closer Look at Rehearsal-Free CL" does).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, *, num_classes: int = 0, pretrained: bool = False):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.pretrained = pretrained
        with warnings.catch_warnings():  # an empty head (no class yet) is expected here
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self.head = nn.Linear(feature_dim, num_classes)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features, ``(B, feature_dim)``."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes)

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(x), features(x))`` from one backbone pass.

        Strategies that need both call this rather than ``head(features(x))``: a model with
        more than one head (DeiT's CLS and DIST heads) is not ``head`` on ``features``.
        """
        features = self.features(x)  # (B, feature_dim)
        return self.head(features), features

    def grow(self, num_classes: int) -> None:
        """Widen the head to ``num_classes`` outputs, keeping the old rows' weights."""
        self.head = grow_linear(self.head, num_classes)


@torch.no_grad()
def grow_linear(layer: nn.Linear, num_classes: int) -> nn.Linear:
    """``layer`` widened to ``num_classes`` outputs (new rows freshly initialised), or itself."""
    if num_classes < layer.out_features:
        raise ValueError(f"the head cannot shrink ({layer.out_features} -> {num_classes})")
    if num_classes == layer.out_features:
        return layer
    new = nn.Linear(layer.in_features, num_classes).to(layer.weight.device, layer.weight.dtype)
    new.weight[: layer.out_features] = layer.weight
    new.bias[: layer.out_features] = layer.bias
    return new
