"""The plugin API: :class:`Strategy`, nine hooks that the Learner calls and that return values.

The Learner (:mod:`clsim.learner`) owns the experience protocol and the engine owns the loop
(:mod:`clsim.engine.engine`); per experience they call::

    setup(model)                                  # once per run, before anything else
    data = before_task(model, task)               # after the head has grown; returns what to train on
    for each epoch:
      before_epoch(model, epoch, epochs, steps)   # e.g. deferred re-weighting, annealing
      for each batch (x, y):
        x, y, extra = prepare_batch(x, y)         # e.g. Mixup/CutMix; y may become soft (B, C)
        loss = loss(model, x, y, extra)           # forward + loss, a scalar tensor
        loss.backward(); after_backward(model); optimizer.step(); after_step(model)
        # with train.sam_rho > 0 (SAM), loss runs a second time at perturbed weights before
        # after_backward: loss must not change the strategy's state
    after_task(model, task, batches)              # e.g. Fisher, snapshots
    out = predict(model, x)                       # evaluation: logits, or (logits, {name: logits})

``task`` is a :class:`Task`: the experience, the earlier ones, the head size and, for
strategies that distil from one (``uses_teacher``), the teacher for this experience. The
Learner is the only caller of these hooks; nothing calls ``before_task`` outside training.
Terms that cut across strategies (FedProx's proximal term) are added to ``loss`` by the
engine, not by wrapping the strategy; a strategy that does wrap another subclasses
:class:`StrategyWrapper`, which forwards every hook in :data:`HOOKS`.

A strategy never reaches into the engine; whatever extra parts it needs (masks, a frozen copy
of the model) it owns, and checkpoints through ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from clsim.registry import STRATEGIES
from clsim.scenarios.base import Experience

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
Prediction = torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]

HOOKS = ("setup", "before_task", "before_epoch", "prepare_batch", "loss", "after_backward",
         "after_step", "after_task", "predict")
"""The nine hooks, in the order the Learner and the engine call them."""

CAPABILITIES = ("uses_teacher", "required_model", "keeps_parameter_state", "mask_past", "freezes_backbone")
"""Declared class attributes that config checks and the Learner read."""


@dataclass(frozen=True)
class Task:
    """What a strategy is told about the experience it is about to learn (or has learnt).

    Attributes:
        experience: the experience (a federated client's: its partition of it).
        past: the earlier experiences, in stream order (a client's: its partitions).
        seen_classes: the head's size while learning it.
        teacher: the frozen teacher for this experience; only for ``uses_teacher`` strategies.
    """

    experience: Experience
    past: tuple[Experience, ...] = ()
    seen_classes: int = 0
    teacher: nn.Module | None = None

    @property
    def index(self) -> int:
        return self.experience.index

    @property
    def first_new_class(self) -> int:
        """The lowest learner label this experience introduces."""
        return min(self.experience.classes)


def split_prediction(out: Prediction) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``predict``'s result as ``(logits, variants)``."""
    if isinstance(out, tuple):
        logits, variants = out
        return logits, dict(variants)
    return out, {}


class Strategy:
    """Base class of every continual-learning strategy; on its own it is plain fine-tuning.

    Subclasses override the hooks they need. Constructor arguments are keyword-only and are
    the strategy's YAML section: ``strategy: {name: ewc, lambda: 100}`` -> ``EWC(lambda_=100)``.
    A subclass that overrides :meth:`before_task` calls ``super().before_task(...)`` and
    returns (or changes) the data set it gives.

    Capabilities (class attributes, read by the config checks and the Learner):
        uses_teacher: the run must give a teacher (``teacher:`` section); it arrives in ``task.teacher``.
        required_model: the registered model this strategy trains, or a tuple of the models it
            can train (None: any).
        keeps_parameter_state: state indexed by parameter position (anchors, importances),
            only meaningful while index i stays the same weight (refused with FedRolex).
        freezes_backbone: the (pretrained) backbone never trains: prompting methods, linear probe.
        mask_past: train with the logits of earlier experiences' classes masked out, so new
            data does not push old classes down (the rehearsal-free practice of the CODA-Prompt
            / "A Closer Look at Rehearsal-Free CL" code, Smith et al. 2023).
    """

    uses_teacher: bool = False
    required_model: str | tuple[str, ...] | None = None
    keeps_parameter_state: bool = False
    mask_past: bool = False
    freezes_backbone: bool = False
    first_new_class: int = 0

    def setup(self, model: nn.Module) -> None:
        """Called once per run (also before a resume loads state) with the model to train."""

    def before_task(self, model: nn.Module, task: Task) -> Dataset:
        """Called before training ``task`` (the head has grown to its classes); returns the
        data to train on (default: the experience's training set)."""
        self.first_new_class = task.first_new_class
        return task.experience.train

    def before_epoch(self, model: nn.Module, epoch: int, epochs: int, steps: int) -> None:
        """Called before each training epoch (``epoch`` from 0 of ``epochs``, ``steps`` batches)."""

    def prepare_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The training batch as ``loss`` sees it, once per step (SAM's second pass reuses it):
        e.g. Mixup/CutMix, which may turn ``y`` into soft targets ``(B, C)``; ``extra`` is
        handed to ``loss`` as it is (e.g. the clean batch). Default: unchanged, no extra."""
        return x, y, None

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: Any = None) -> torch.Tensor:
        """Training forward pass and loss: cross-entropy over the classes seen so far."""
        return F.cross_entropy(self.training_logits(model(x)), y)

    def training_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with earlier experiences' classes at -inf when :attr:`mask_past` is on."""
        if not self.mask_past or self.first_new_class == 0:
            return logits
        masked = logits.clone()
        masked[:, : self.first_new_class] = float("-inf")
        return masked

    def after_backward(self, model: nn.Module) -> None:
        """Called between ``backward()`` and ``optimizer.step()`` (e.g. to mask gradients)."""

    def after_step(self, model: nn.Module) -> None:
        """Called after ``optimizer.step()`` (e.g. to clamp parameters or undo weight decay on
        frozen ones: momentum and decay move weights whose gradient was masked to zero)."""

    def after_task(self, model: nn.Module, task: Task, batches: Batches) -> None:
        """Called after training ``task``; ``batches()`` iterates its training data. A federated
        client calls it on a strategy restored from its saved state, with the final global
        model: read what the task is from ``task``, not from state ``before_task`` left."""

    def predict(self, model: nn.Module, x: torch.Tensor) -> Prediction:
        """Evaluation logits ``(B, classes seen so far)``; no task id is given. May return
        ``(logits, {name: logits})``: named alternative predictions the run also scores (e.g.
        DeiT's CLS-only and DIST-only heads next to their mean, ``metrics.json`` ``variants``)."""
        return model(x)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue from a checkpoint (tensors and plain data)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; called after :meth:`setup` and after the model loads."""


class StrategyWrapper(Strategy):
    """A strategy around another: every hook in :data:`HOOKS`, ``state_dict`` /
    ``load_state_dict`` and every capability is the wrapped strategy's unless a subclass
    overrides it. Forwarding is built from the hook list, so a hook added to the API is
    forwarded without touching any wrapper."""

    def __init__(self, inner: Strategy):
        self.inner = inner


def _forward_hook(name: str) -> Callable[..., Any]:
    def forward(self: StrategyWrapper, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, name)(*args, **kwargs)

    forward.__name__ = name
    forward.__doc__ = f"The wrapped strategy's ``{name}``."
    return forward


def _forward_capability(name: str) -> property:
    return property(lambda self: getattr(self.inner, name), doc=f"The wrapped strategy's ``{name}``.")


for _name in (*HOOKS, "training_logits", "state_dict", "load_state_dict"):
    setattr(StrategyWrapper, _name, _forward_hook(_name))
for _name in CAPABILITIES:
    setattr(StrategyWrapper, _name, _forward_capability(_name))
del _name


@STRATEGIES.register("finetune")
class Finetune(Strategy):
    """Plain fine-tuning on each experience in turn: the lower bound (catastrophic forgetting).

    Args:
        mask_past: mask earlier classes' logits in the training loss.
    """

    def __init__(self, *, mask_past: bool = False):
        self.mask_past = mask_past
