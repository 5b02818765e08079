"""Logit adjustment: train through the class prior of the data, predict with the plain logits."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from clsim.errors import ConfigError
from clsim.losses import log_prior, logit_adjusted_cross_entropy
from clsim.registry import STRATEGIES
from clsim.strategies.base import Batches, Strategy, Task


@STRATEGIES.register("logit_adjust")
class LogitAdjust(Strategy):
    """Logit-adjusted loss (Menon et al., ICLR 2021): CE on logits shifted by tau * log prior.

    "Long-tail learning via logit adjustment", eq. 10: the training loss is
    CE(f(x) + tau * log pi, y), with pi the class prior of the data being trained on (the
    labels of the experience's training set, counted in :meth:`before_task`). Prediction is
    the plain argmax of f: the adjustment is only in the loss, which makes f itself estimate
    the balanced-error classifier. tau = 1 is Ren et al.'s balanced softmax (NeurIPS 2020); on
    balanced data the loss is plain cross-entropy.

    Classes the data has no images of (a grown head's earlier classes) count as one image,
    so their logits are still trained, pushed down only as weakly as the rarest class's;
    ``mask_past`` takes them out of the loss altogether (the limit of prior 0).

    State: none across experiences. The prior belongs to the experience being trained; it
    is dropped in :meth:`after_task` (the loss between experiences is plain CE), so a
    checkpoint, always taken between experiences, has nothing to save.

    Args:
        tau: strength of the adjustment, >= 0 (Menon et al. use 1; 0 is plain CE).
        mask_past: mask earlier classes' logits in the training loss.
    """

    def __init__(self, *, tau: float = 1.0, mask_past: bool = False):
        if tau < 0:
            raise ConfigError("strategy.tau", f"expected a number >= 0, got {tau}")
        self.tau = tau
        self.mask_past = mask_past
        self.counts: np.ndarray | None = None  # (C,) training images per class, this experience
        self._prior: torch.Tensor | None = None  # (C,) log prior on the logits' device

    def before_task(self, model: nn.Module, task: Task) -> Dataset:
        data = super().before_task(model, task)
        self.counts = np.bincount(np.asarray(data.targets), minlength=max(task.experience.classes) + 1)
        self._prior = None
        return data

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: Any = None) -> torch.Tensor:
        logits = self.training_logits(model(x))  # (B, C)
        if self.counts is None:
            return F.cross_entropy(logits, y)
        return logit_adjusted_cross_entropy(logits, y, self.log_prior(logits), self.tau)

    def log_prior(self, logits: torch.Tensor) -> torch.Tensor:
        """``(C,)`` log prior for ``logits``' classes (absent ones counted as one image)."""
        C = logits.shape[1]
        if self._prior is None or len(self._prior) != C or self._prior.device != logits.device:
            counts = np.pad(self.counts, (0, max(C - len(self.counts), 0)))[:C]
            self._prior = log_prior(np.maximum(counts, 1)).to(logits.device)
        return self._prior

    def after_task(self, model: nn.Module, task: Task, batches: Batches) -> None:
        self.counts, self._prior = None, None
