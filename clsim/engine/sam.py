"""Sharpness-Aware Minimization: a two-step update around any base optimizer.

SAM (Foret et al., ICLR 2021, "Sharpness-Aware Minimization for Efficiently Improving
Generalization") minimises the worst loss in an L2 ball of radius rho around the weights.
Its first-order approximation (eq. 2) is one ascent step and one descent step per batch::

    g   = grad L(w)                         # first forward/backward
    e_w = rho * g / ||g||_2                 # perturb():  w <- w + e_w
    g'  = grad L(w + e_w)                   # second forward/backward, at the perturbed point
    w   <- base_step(w, g')                 # restore():  w back exactly; then optimizer.step()

||g||_2 is the norm over all parameters together. ``adaptive`` is ASAM (Kwon et al., ICML
2021, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep
Neural Networks"), whose ball is scaled per weight by T_w = |w|:
e_w = rho * T_w^2 g / ||T_w g||_2. The authors' code adds eta = 0.01 to |w|; here eta = 0, as
in the widely used davda54/sam. ASAM's radius is on another scale (the authors' default 0.5).

The engine drives the steps (:meth:`clsim.engine.engine.Engine.step`), with the strategy's
``after_backward`` between :meth:`SAM.restore` and the base optimizer's step. This class only
moves weights and draws no random numbers, so determinism and exact resume are untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class SAM:
    """Moves the weights to w + e_w (:meth:`perturb`) and back, bit for bit (:meth:`restore`).

    Between the two the caller computes the gradient at w + e_w; after :meth:`restore` it steps
    the base optimizer with that gradient, at the original weights.

    Args:
        optimizer: the base optimizer (SGD, Adam, AdamW, ...), whose parameters are perturbed;
            it keeps its learning rate and weight decay and is stepped by the caller.
        rho: the neighbourhood radius (>= 0; 0 makes the second gradient equal the first).
        adaptive: ASAM's per-weight scaling of the neighbourhood.
        eps: added to the gradient norm, so a zero gradient gives no perturbation.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, rho: float, adaptive: bool = False,
                 eps: float = 1e-12):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.optimizer = optimizer
        self.rho = rho
        self.adaptive = adaptive
        self.eps = eps
        # (parameter, its value before perturb()) for the parameters perturb() moved
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def params_with_grad(self) -> list[torch.Tensor]:
        """The base optimizer's parameters that have a gradient now."""
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def perturb(self) -> None:
        """w <- w + e_w from the current gradients (the first backward pass must have run)."""
        if self._saved:
            raise RuntimeError("perturb() called twice without restore()")
        params = self.params_with_grad()
        if not params:
            return
        scaled = [p.grad * p.abs() if self.adaptive else p.grad for p in params]  # T_w g
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        scale = self.rho / (norm + self.eps)
        for p, s in zip(params, scaled):
            # Keep the original values, not e_w: (w + e) - e need not equal w in floating point.
            self._saved.append((p, p.detach().clone()))
            p.add_(s * p.abs() * scale if self.adaptive else s * scale)  # T_w^2 g * rho / ||T_w g||

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the exact weights perturb() started from (gradients are left as they are)."""
        for p, original in self._saved:
            p.copy_(original)
        self._saved = []


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Batch norm uses batch statistics but leaves its running statistics alone inside the block.

    SAM's second forward pass runs at the perturbed weights w + e_w; its batch statistics
    must not enter the running mean and variance used at evaluation, which then stay those
    of the weights actually trained (as the reference code's ``disable_running_stats``, with
    no momentum to restore and no extra ``num_batches_tracked`` count).
    """
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False  # training mode: batch statistics, no buffer updates
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True
