"""Synaptic Intelligence as a third-party clsim strategy (an example of the plugin API).

Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017.
Use it from any experiment file by path, with no installation and no registration::

    strategy: {plugin: strategies/si.py:SI, lambda: 1.0, xi: 0.1}

or from the command line::

    clsim run scenarios/quickstart.yaml --set 'strategy={plugin: strategies/si.py:SI, lambda: 1.0}'

On scenarios/quickstart.yaml (digits, 5 tasks, a small ViT, 10 epochs, CPU) with ``lambda: 1,
mask_past: true``: average accuracy 0.213 / 0.218 and forgetting 0.47 / 0.51 (seeds 0 / 1);
the file's own EWC (``lambda: 1000, mask_past: true``) gives 0.225 with forgetting 0.34 and
plain fine-tuning 0.172 with forgetting 0.90 (seed 0). Larger lambda trades plasticity for
stability: ``lambda: 100`` gives 0.162 with forgetting 0.14 (seed 0).

The guide to writing one of these is docs/plugins.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from clsim import Registry, Strategy
from clsim.errors import ConfigError
from clsim.strategies.base import Batches, Task
from clsim.strategies.params import ParamSpec, overlap, select_parameters

Tensors = dict[str, torch.Tensor]

# Decorator registration, shown on a registry of this file's own. Registering into clsim's
# STRATEGIES at import time would fail the second time this file is loaded as a different
# module (by path from YAML, and again by `import`): two distinct SI classes under one name.
# A package of your own would write `@clsim.STRATEGIES.register("si")` instead (docs/plugins.md).
EXAMPLES = Registry("strategy")


@EXAMPLES.register("si")
class SI(Strategy):
    """Synaptic Intelligence (Zenke et al., ICML 2017): path-integral importance per weight.

    While a task trains, each parameter accumulates how much it lowered the loss along its
    trajectory, omega_k = -sum_t g_k(t) * delta_k(t) (the path integral of Sec. 3, eq. 3, as a
    sum over optimizer steps). At the task's end, omega_k is normalised by the squared total
    displacement of the weight in that task (eq. 5) and added to its importance Omega_k; later
    tasks then pay lambda * sum_k Omega_k (theta_k - theta*_k)^2 for moving it (eq. 4, where
    the paper's c is ``lambda``).

    Which gradient: the paper writes g_k = dL/dtheta_k; the authors' code (ganguli-lab/pathint,
    ``unreg_grads`` in ``optimizers.py``, used by ``PATH_INT_PROTOCOL``) makes it the gradient
    of the task loss alone, without the surrogate term of eq. 4, and so does this class.
    delta is the step the optimizer really took, so the estimate holds for Adam as for SGD.
    The engine hands :meth:`after_backward` the gradient of the *total* loss, so the
    surrogate's own gradient, 2 * lambda * Omega * (theta - theta*), is subtracted from it in
    closed form (no second backward pass). Some re-implementations use the total gradient
    instead; up to the end of the first task the two are the same. As in the authors' code,
    the summed importance is clipped at 0 (noisy steps can make omega slightly negative).

    A grown classifier head keeps its old rows first: importances and anchors of earlier
    tasks cover those rows only, and new rows start with zero importance. Cost: two extra
    copies of the selected parameters (last step's weights and gradient) during training.

    Args:
        lambda: surrogate-loss strength (the paper's c).
        xi: damping in eq. 5's denominator, so weights that barely moved do not get huge
            importance (the authors' runs use 0.1 on permuted MNIST, 1e-3 on split CIFAR).
        params: 'all', 'backbone', 'attention' or a list of parameter-name globs.
        mask_past: mask earlier classes' logits in the cross-entropy term.
    """

    keeps_parameter_state = True  # importances and anchors, per parameter position

    def __init__(
        self, *, lambda_: float = 1.0, xi: float = 0.1, params: ParamSpec = "all", mask_past: bool = False,
    ):
        if lambda_ < 0:
            raise ConfigError("strategy.lambda", f"expected a number >= 0, got {lambda_}")
        if xi <= 0:
            raise ConfigError("strategy.xi", f"expected a number > 0, got {xi}")
        self.lambda_ = lambda_
        self.xi = xi
        self.params = params
        self.mask_past = mask_past
        self.names: list[str] = []
        # What outlives a task, and so is checkpointed:
        self.importance: Tensors = {}  # Omega_k, eq. 5, summed over finished tasks
        self.anchor: Tensors = {}  # theta*_k: the weights at the end of the last task
        # What lives within one task (empty at task boundaries, where local runs checkpoint):
        self.omega: Tensors = {}  # omega_k of the current task, the running path integral
        self.start: Tensors = {}  # theta_k at the start of the current task
        self.step_params: Tensors = {}  # theta_k(t) of the last step, before its update
        self.step_grads: Tensors = {}  # task-loss gradient g_k(t) of the last step

    # -- hooks ------------------------------------------------------------------------------

    def setup(self, model: nn.Module) -> None:
        self.names = select_parameters(model, self.params)

    def before_task(self, model: nn.Module, task: Task) -> Dataset:
        data = super().before_task(model, task)
        self.start = self.snapshot(model)  # after the head grew: the task's full shapes
        self.omega = {n: torch.zeros_like(t) for n, t in self.start.items()}
        self.step_params, self.step_grads = {}, {}
        return data

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: Any = None) -> torch.Tensor:
        ce = super().loss(model, x, y, extra)
        if not self.anchor or self.lambda_ == 0:
            return ce
        return ce + self.lambda_ * self.penalty(model)  # eq. 4

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        # The previous step's update is visible only now, before this step's update.
        params = dict(model.named_parameters())
        self.accumulate(params)
        for n in self.names:
            p = params[n]
            grad = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            self.step_grads[n] = self.remove_penalty_grad(n, p, grad)
            self.step_params[n] = p.detach().clone()

    @torch.no_grad()
    def after_task(self, model: nn.Module, task: Task, batches: Batches) -> None:
        params = dict(model.named_parameters())
        self.accumulate(params)  # the task's last update
        end = self.snapshot(model)
        for n, theta in end.items():
            if n not in self.omega:
                # no path integral on this instance (a federated client that did not train in this
                # experience consolidates on a state without one): nothing to add
                self.omega[n], self.start[n] = torch.zeros_like(theta), theta
            # eq. 5: Omega_k += omega_k / (Delta_k^2 + xi), Delta_k = theta_k(end) - theta_k(start).
            new = self.omega[n] / ((theta - self.start[n]).pow(2) + self.xi)
            if n in self.importance:
                new[_slices(self.importance[n])] += self.importance[n]
            # omega can come out slightly negative (steps that raised the task loss); the
            # authors' code clips the summed importance at 0 (a relu), and so do we.
            self.importance[n] = new.clamp_(min=0)
        self.anchor = end
        self.omega, self.start, self.step_params, self.step_grads = {}, {}, {}, {}

    def state_dict(self) -> dict[str, Any]:
        # The within-task state is empty at task boundaries (where local runs checkpoint), but a
        # federated client saves after every round and consolidates on the restored state: with
        # it, that consolidation adds the path integral of the client's last round.
        return {"importance": self.importance, "anchor": self.anchor, "omega": self.omega,
                "start": self.start, "step_params": self.step_params, "step_grads": self.step_grads}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance = dict(state["importance"])
        self.anchor = dict(state["anchor"])
        for key in ("omega", "start", "step_params", "step_grads"):  # absent from older files
            setattr(self, key, dict(state.get(key, {})))

    # -- the method ----------------------------------------------------------------------

    def snapshot(self, model: nn.Module) -> Tensors:
        """Detached copies of the selected parameters."""
        params = dict(model.named_parameters())
        return {n: params[n].detach().clone() for n in self.names}

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """sum_k Omega_k (theta_k - theta*_k)^2 over the anchored (old-shape) part of each weight."""
        params = dict(model.named_parameters())
        total = torch.zeros((), device=next(model.parameters()).device)
        for n, star in self.anchor.items():
            total = total + (self.importance[n] * (overlap(params[n], star) - star).pow(2)).sum()
        return total

    def remove_penalty_grad(self, name: str, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` (of the total loss) minus the surrogate's gradient: the task-loss gradient."""
        if name not in self.anchor or self.lambda_ == 0:
            return grad
        star = self.anchor[name]
        grad[_slices(star)] -= 2 * self.lambda_ * self.importance[name] * (overlap(param, star) - star)
        return grad

    def accumulate(self, params: dict[str, nn.Parameter]) -> None:
        """omega_k += -g_k(t) * (theta_k(t+1) - theta_k(t)) for the last recorded step (eq. 3)."""
        for n, before in self.step_params.items():
            self.omega[n] -= self.step_grads[n] * (params[n].detach() - before)
        self.step_params, self.step_grads = {}, {}


def _slices(old: torch.Tensor) -> tuple[slice, ...]:
    """Index of the part of a (grown) tensor that has ``old``'s shape: old rows come first."""
    return tuple(slice(0, s) for s in old.shape)
