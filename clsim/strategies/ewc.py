"""Elastic Weight Consolidation with the diagonal empirical Fisher."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from clsim.errors import ConfigError
from clsim.registry import STRATEGIES
from clsim.strategies.anchored import AnchoredPenalty, FirstAnchor, Tensors
from clsim.strategies.base import Batches, Task
from clsim.strategies.params import ParamSpec, overlap

FisherEstimator = Literal["batch", "example", "batch_mean"]


@STRATEGIES.register("ewc")
class EWC(AnchoredPenalty):
    """Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017), diagonal empirical Fisher.

    After each task the Fisher diagonal F is estimated from squared gradients of the
    cross-entropy at the true labels over the task's training data (``fisher``):

    - ``batch`` (default; the estimator of the authors' code for "A Closer Look at
      Rehearsal-Free CL", Smith et al. 2023, ``EWC_MC.accumulate_block_memory``):
      F = sum_b |b| g_b^2 / n_batches, g_b the gradient of batch b's mean loss. With equal
      batches this is B times ``batch_mean``.
    - ``example``: the mean over examples of per-example squared gradients, (1/N) sum_i g_i^2
      (the empirical Fisher itself; per-example gradients by ``torch.func.vmap``).
    - ``batch_mean``: the mean over batches of g_b^2 (clsim's earlier estimator and Avalanche's
      EWCPlugin): about B times smaller than ``batch``, so a lambda tuned with it is B times
      too large for the others.

    ``mode: separate`` keeps one (anchor, Fisher) pair per task (Kirkpatrick et al., eq. 3
    summed over tasks); ``mode: online`` keeps a single pair, F <- decay * F + F_new, anchored
    at the latest weights (Schwarz et al. 2018, "Progress & Compress"; the authors' code is
    online with decay 1). ``l2`` adds the authors' companion term eps ||theta - theta*||^2
    toward the latest anchor (l2 = 2 eps); with ``first_task_anchor`` it acts from the first
    task, whose anchor has zero Fisher (the authors' code zero-initialises it).

    Scale against the authors' code: clsim adds lambda/2 sum F (theta - theta*)^2 where the
    code adds mu sum F (theta - theta*)^2, so lambda = 2 mu with ``fisher: batch``.

    Args:
        lambda: penalty weight (the loss adds lambda/2 * sum F (theta - theta*)^2).
        mode: 'separate' or 'online'.
        decay: online mode's Fisher decay gamma in [0, 1].
        params: 'all', 'backbone', 'attention' or a list of parameter-name globs.
        mask_past: mask earlier classes' logits in the cross-entropy term.
        fisher: 'batch', 'example' or 'batch_mean' (see above).
        l2: weight of the plain L2 term toward the latest anchor (the loss adds l2/2 * ||theta - theta*||^2).
        first_task_anchor: 'pretrained', 'start' or 'none' (see :class:`~clsim.strategies.anchored.AnchoredPenalty`).
    """

    def __init__(
        self, *, lambda_: float = 100.0, mode: Literal["separate", "online"] = "separate",
        decay: float = 1.0, params: ParamSpec = "all", mask_past: bool = False,
        fisher: FisherEstimator = "batch", l2: float = 0.0, first_task_anchor: FirstAnchor = "pretrained",
    ):
        super().__init__(lambda_=lambda_, params=params, mask_past=mask_past, first_task_anchor=first_task_anchor)
        if not 0.0 <= decay <= 1.0:
            raise ConfigError("strategy.decay", f"expected a number in [0, 1], got {decay}")
        if fisher not in ("batch", "example", "batch_mean"):
            raise ConfigError("strategy.fisher", f"expected 'batch', 'example' or 'batch_mean', got {fisher!r}")
        if not l2 >= 0:
            raise ConfigError("strategy.l2", f"expected a number >= 0, got {l2}")
        self.mode, self.decay, self.fisher_estimator, self.l2 = mode, decay, fisher, l2
        self.initial_anchor = False  # the anchors are only the first task's zero-Fisher one

    def first_importance(self, model: nn.Module) -> Tensors:
        self.initial_anchor = True
        params = dict(model.named_parameters())
        return {n: torch.zeros_like(params[n]) for n in self.names}

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: Any = None) -> torch.Tensor:
        loss = super().loss(model, x, y, extra)
        if self.l2 == 0 or not self.anchors:
            return loss
        anchor, params = self.anchors[-1][0], dict(model.named_parameters())
        l2 = sum((overlap(params[n], a) - a).pow(2).sum() for n, a in anchor.items())
        return loss + 0.5 * self.l2 * l2

    def fisher(self, model: nn.Module, batches: Batches) -> Tensors:
        """The Fisher diagonal of the selected parameters by :attr:`fisher_estimator`."""
        # eval mode: batch-norm statistics must not move while we only measure gradients
        was_training = model.training
        model.eval()
        try:
            if self.fisher_estimator == "example":
                return self._per_example_fisher(model, batches)
            return self._batch_fisher(model, batches)
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)

    def _batch_fisher(self, model: nn.Module, batches: Batches) -> Tensors:
        params = dict(model.named_parameters())
        total = {n: torch.zeros_like(params[n]) for n in self.names}
        n_batches = 0
        for x, y in batches():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            scale = len(y) if self.fisher_estimator == "batch" else 1
            for n in self.names:
                if params[n].grad is not None:
                    total[n] += params[n].grad.detach().pow(2) * scale
            n_batches += 1
        return {n: f / max(n_batches, 1) for n, f in total.items()}

    def _per_example_fisher(self, model: nn.Module, batches: Batches) -> Tensors:
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = dict(model.named_buffers())
        chosen = {n: params[n] for n in self.names}

        def example_loss(weights: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, (params | weights, buffers), (x[None],))
            return F.cross_entropy(out, y[None])

        per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
        total = {n: torch.zeros_like(p) for n, p in chosen.items()}
        count = 0
        for x, y in batches():
            for n, g in per_example(chosen, x, y).items():  # (B, *shape) each
                total[n] += g.pow(2).sum(dim=0)
            count += len(y)
        return {n: f / max(count, 1) for n, f in total.items()}

    def after_task(self, model: nn.Module, task: Task, batches: Batches) -> None:
        new = self.fisher(model, batches)
        if self.mode == "online" and self.anchors:
            _, old = self.anchors[0]
            new = {n: f + self.decay * _pad_to(old[n], f) for n, f in new.items()}
        pair = (self.snapshot(model), new)
        replace = self.mode == "online" or self.initial_anchor  # the zero-Fisher first anchor adds nothing
        self.anchors = [pair] if replace else [*self.anchors, pair]
        self.initial_anchor = False

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"initial_anchor": self.initial_anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.initial_anchor = state.get("initial_anchor", False)


def _pad_to(old: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``old`` zero-padded to ``like``'s shape (a grown head has new rows with no Fisher yet)."""
    if old.shape == like.shape:
        return old
    out = torch.zeros_like(like)
    out[tuple(slice(0, s) for s in old.shape)] = old
    return out
