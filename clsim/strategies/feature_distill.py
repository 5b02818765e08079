"""Feature distillation toward the previous model's features."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clsim.registry import STRATEGIES
from clsim.strategies.distillation import SelfDistillation


@STRATEGIES.register("feature_distill")
class FeatureDistill(SelfDistillation):
    """Feature distillation: MSE between current and previous-model features (Smith et al. 2023).

    The "feature distillation" rehearsal-free baseline of "A Closer Look at Rehearsal-Free
    Continual Learning" (after Hou et al. 2019's less-forget constraint): loss = CE + lambda *
    mean ||f(x) - f_old(x)||^2 over the backbone's pooled features.

    Args:
        lambda: weight of the feature term.
    """

    def __init__(self, *, lambda_: float = 1.0):
        super().__init__(lambda_=lambda_)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: Any = None) -> torch.Tensor:
        logits, features = model.logits_and_features(x)  # (B, C), (B, D)
        ce = F.cross_entropy(logits, y)
        if self.teacher is None or self.lambda_ == 0:
            return ce
        with torch.no_grad():
            old = self.teacher.features(x)
        return ce + self.lambda_ * F.mse_loss(features, old)
