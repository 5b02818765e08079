"""Elastic Weight Consolidation with the diagonal empirical Fisher."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from clsim.errors import ConfigError
from clsim.registry import STRATEGIES
from clsim.strategies.anchored import AnchoredPenalty, Tensors
from clsim.strategies.base import Batches, Task
from clsim.strategies.params import ParamSpec


@STRATEGIES.register("ewc")
class EWC(AnchoredPenalty):
    """Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017), diagonal empirical Fisher.

    After each task the Fisher diagonal is estimated as the mean over training mini-batches of
    the squared gradient of the cross-entropy at the true labels (the mini-batch empirical
    Fisher, as in Avalanche's EWCPlugin). ``mode: separate`` keeps one (anchor, Fisher) pair
    per task (Kirkpatrick et al., eq. 3 summed over tasks); ``mode: online`` keeps a single
    pair, F <- decay * F + F_new, anchored at the latest weights (Schwarz et al. 2018,
    "Progress & Compress").

    Args:
        lambda: penalty weight (the loss adds lambda/2 * sum F (theta - theta*)^2).
        mode: 'separate' or 'online'.
        decay: online mode's Fisher decay gamma in [0, 1].
        params: 'all', 'backbone', 'attention' or a list of parameter-name globs.
        mask_past: mask earlier classes' logits in the cross-entropy term.
    """

    def __init__(
        self, *, lambda_: float = 100.0, mode: Literal["separate", "online"] = "separate",
        decay: float = 1.0, params: ParamSpec = "all", mask_past: bool = False,
    ):
        super().__init__(lambda_=lambda_, params=params, mask_past=mask_past)
        if not 0.0 <= decay <= 1.0:
            raise ConfigError("strategy.decay", f"expected a number in [0, 1], got {decay}")
        self.mode = mode
        self.decay = decay

    def fisher(self, model: nn.Module, batches: Batches) -> Tensors:
        """Mean over mini-batches of squared loss gradients, per selected parameter."""
        params = dict(model.named_parameters())
        total = {n: torch.zeros_like(params[n]) for n in self.names}
        # eval mode: batch-norm statistics must not move while we only measure gradients
        was_training, n_batches = model.training, 0
        model.eval()
        for x, y in batches():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            for n in self.names:
                if params[n].grad is not None:
                    total[n] += params[n].grad.detach().pow(2)
            n_batches += 1
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        return {n: f / max(n_batches, 1) for n, f in total.items()}

    def after_task(self, model: nn.Module, task: Task, batches: Batches) -> None:
        new = self.fisher(model, batches)
        if self.mode == "online" and self.anchors:
            _, old = self.anchors[0]
            new = {n: f + self.decay * _pad_to(old[n], f) for n, f in new.items()}
        pair = (self.snapshot(model), new)
        self.anchors = [pair] if self.mode == "online" else [*self.anchors, pair]


def _pad_to(old: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``old`` zero-padded to ``like``'s shape (a grown head has new rows with no Fisher yet)."""
    if old.shape == like.shape:
        return old
    out = torch.zeros_like(like)
    out[tuple(slice(0, s) for s in old.shape)] = old
    return out
