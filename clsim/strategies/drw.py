"""Deferred re-weighting: plain cross-entropy first, class-balanced cross-entropy at the end."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from clsim.errors import ConfigError
from clsim.losses import class_balanced_weights
from clsim.registry import STRATEGIES
from clsim.strategies.base import Batches, Strategy, Task


@STRATEGIES.register("drw")
class DRW(Strategy):
    """Deferred re-weighting (Cao et al., NeurIPS 2019): plain CE, then class-balanced CE.

    "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss", Sec. 3.3 /
    Algorithm 1: train with unweighted cross-entropy until epoch ``start_epoch``, then
    weight each sample's loss by its class's weight w_c = (1 - beta) / (1 - beta^n_c)
    (Cui et al.'s class-balanced weights, n_c = the class's images in the experience's
    training data, counted in :meth:`before_task`). Features are learnt on the natural
    distribution first; the re-weighting then moves the decision boundaries toward the tail.
    The weighted loss is ``F.cross_entropy(..., weight=w)``: sum_i w_yi l_i / sum_i w_yi, as in
    the authors' code. DeiT-LT (Rangwani et al., CVPR 2024) uses the same re-weighting on
    its distillation loss.

    State: none across experiences. Every experience starts unweighted again; the counts
    and weights are dropped in :meth:`after_task`, so a checkpoint (taken between
    experiences) has nothing to save.

    Args:
        start_epoch: first re-weighted epoch (from 0). Default: 4/5 of the epochs, rounded
            down (Cao et al.: epoch 160 of 200), so at least the last epoch is re-weighted.
            At or beyond the epoch count, training is never re-weighted.
        beta: class-balanced weights' beta in [0, 1) (0: uniform; Cao et al. use 0.9999).
        mask_past: mask earlier classes' logits in the training loss.
    """

    def __init__(self, *, start_epoch: int | None = None, beta: float = 0.9999, mask_past: bool = False):
        if start_epoch is not None and start_epoch < 0:
            raise ConfigError("strategy.start_epoch", f"expected an int >= 0 or null, got {start_epoch}")
        if not 0.0 <= beta < 1.0:
            raise ConfigError("strategy.beta", f"expected a number in [0, 1), got {beta}")
        self.start_epoch = start_epoch
        self.beta = beta
        self.mask_past = mask_past
        self.counts: np.ndarray | None = None  # (C,) training images per class, this experience
        self.weights: torch.Tensor | None = None  # (C,) class weights; None: unweighted phase

    def first_weighted_epoch(self, epochs: int) -> int:
        """``start_epoch``, or 4/5 of ``epochs`` rounded down when it is not given."""
        return epochs * 4 // 5 if self.start_epoch is None else self.start_epoch

    def before_task(self, model: nn.Module, task: Task) -> Dataset:
        data = super().before_task(model, task)
        self.counts = np.bincount(np.asarray(data.targets), minlength=max(task.experience.classes) + 1)
        return data

    def before_epoch(self, model: nn.Module, epoch: int, epochs: int, steps: int) -> None:
        deferred = self.counts is None or epoch < self.first_weighted_epoch(epochs)
        self.weights = None if deferred else class_balanced_weights(self.counts, self.beta)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: Any = None) -> torch.Tensor:
        logits = self.training_logits(model(x))  # (B, C)
        weight = None if self.weights is None else self.class_weights(logits)
        return F.cross_entropy(logits, y, weight=weight)

    def class_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """``(C,)`` weights for ``logits``' classes (0 for classes with no images)."""
        C = logits.shape[1]
        if len(self.weights) != C or self.weights.device != logits.device:
            self.weights = F.pad(self.weights, (0, max(C - len(self.weights), 0)))[:C].to(logits.device)
        return self.weights

    def after_task(self, model: nn.Module, task: Task, batches: Batches) -> None:
        self.counts, self.weights = None, None
