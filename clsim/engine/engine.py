"""The local training loop: fit one experience, evaluate test sets. Every strategy shares it.

The engine knows nothing of YAML or of the run folder; it takes typed settings
(:class:`~clsim.config.TrainConfig`), a model, a strategy and data sets.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from clsim.config.schema import TrainConfig
from clsim.data.base import supports_batches
from clsim.engine.param_groups import parameter_groups
from clsim.engine.progress import Progress
from clsim.engine.sam import SAM, frozen_batchnorm_stats
from clsim.errors import ConfigError
from clsim.seeds import FIT, derive_seed, seed_torch
from clsim.strategies.base import Strategy, split_prediction

LossTerm = Callable[[nn.Module], torch.Tensor]
"""An extra loss term of the model's weights, added at every step (e.g. FedProx's proximal term)."""




def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without one is an input error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device", f"'{name}' requested but no CUDA device is available")
    return torch.device(name)


@dataclass(frozen=True)
class EvalResult:
    """Per-class correct / total counts on one test set (index = learner label).

    ``variants`` holds per-class correct counts of the strategy's alternative predictions
    (:meth:`Strategy.predict` returning ``(logits, {name: logits})``), by name; ``total`` is shared.
    """

    correct: np.ndarray
    total: np.ndarray
    variants: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return float(self.correct.sum() / max(self.total.sum(), 1))


class Engine:
    """Trains and evaluates with one :class:`TrainConfig` on one device.

    Args:
        train: optimisation and evaluation settings.
        seed: the experiment seed; every experience and epoch derives its own stream from it,
            so a resumed run draws the same batches as an uninterrupted one.
        progress: where bars go.
    """

    def __init__(self, train: TrainConfig, *, seed: int, progress: Progress | None = None):
        self.train = train
        self.seed = seed
        self.device = resolve_device(train.device)
        self.progress = progress or Progress(quiet=True)
        # Called with each training step's loss (experiment tracking, clsim.tracking); None: nothing.
        self.on_step: Callable[[float], None] | None = None

    def batches(
        self, dataset: Dataset, *, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` batches on the engine's device; in-memory data skips the DataLoader."""
        gen = torch.Generator().manual_seed(seed)
        if supports_batches(dataset):
            order = torch.randperm(len(dataset), generator=gen) if shuffle else torch.arange(len(dataset))
            for start in range(0, len(order), batch_size):
                x, y = dataset.get_batch(order[start : start + batch_size])
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            return
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                            num_workers=self.train.num_workers, pin_memory=self.device.type == "cuda")
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def fit(self, model: nn.Module, strategy: Strategy, dataset: Dataset, *, experience: int, label: str,
            epochs: int | None = None, terms: Sequence[LossTerm] = ()) -> float:
        """Train on ``dataset`` for ``epochs`` (default: the configured ones); returns the last
        epoch's mean loss. ``terms`` are added to the strategy's loss at every step (FedProx's
        proximal term); ``experience`` names the seed stream of batches, dropout and augmentation."""
        epochs = epochs or self.train.epochs
        seed_torch(derive_seed(self.seed, experience, FIT))  # dropout, augmentation
        optimizer = self._optimizer(model)
        steps_per_epoch = math.ceil(len(dataset) / self.train.batch_size)
        schedule = self._schedule(optimizer, steps_per_epoch * epochs)
        bar = self.progress.bar(label, steps_per_epoch * epochs)
        model.train()
        mean_loss = float("nan")
        for epoch in range(epochs):
            total, count = 0.0, 0
            strategy.before_epoch(model, epoch, epochs, steps_per_epoch)
            seed = derive_seed(self.seed, experience, epoch)
            for x, y in self.batches(dataset, batch_size=self.train.batch_size, shuffle=True, seed=seed):
                loss = self.step(model, strategy, optimizer, x, y, terms=terms)
                schedule.step()
                if self.on_step is not None:
                    self.on_step(loss)
                total, count = total + loss * len(y), count + len(y)
                bar.advance(info=f"epoch {epoch + 1}/{epochs} loss {loss:.3f}")
            mean_loss = total / max(count, 1)
        bar.close()
        return mean_loss

    def step(self, model: nn.Module, strategy: Strategy, optimizer: torch.optim.Optimizer,
             x: torch.Tensor, y: torch.Tensor, *, terms: Sequence[LossTerm] = ()) -> float:
        """One optimisation step through the strategy's hooks; returns the loss value.

        With ``train.sam_rho > 0`` the step uses SAM's gradient (see :meth:`_sam_gradient`);
        the loss returned is still the one at the current weights.
        """
        batch = strategy.prepare_batch(x, y)
        loss = self._backward(model, strategy, optimizer, batch, terms)
        if self.train.sam_rho > 0:
            self._sam_gradient(model, strategy, optimizer, batch, terms)
        strategy.after_backward(model)
        optimizer.step()
        strategy.after_step(model)
        return float(loss.detach())

    def _backward(self, model: nn.Module, strategy: Strategy, optimizer: torch.optim.Optimizer,
                  batch: tuple[torch.Tensor, torch.Tensor, Any], terms: Sequence[LossTerm]) -> torch.Tensor:
        """Forward and loss through the strategy's hook, plus ``terms``, and backward; the
        gradient replaces the last one."""
        x, y, extra = batch
        with self._autocast():
            loss = strategy.loss(model, x, y, extra)
            for term in terms:
                loss = loss + term(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def _sam_gradient(self, model: nn.Module, strategy: Strategy, optimizer: torch.optim.Optimizer,
                      batch: tuple[torch.Tensor, torch.Tensor, Any], terms: Sequence[LossTerm]) -> None:
        """Replace the gradient at w by the one at w + e_w, then put w back exactly (SAM, eq. 2).

        ``after_backward`` then runs once, on this final gradient and at the restored weights:
        it shapes the update the optimizer applies (e.g. masks gradients) and may record
        per-step history (SI's path integral pairs it with the step's update), whereas the first
        gradient only picks SAM's ascent direction and is never applied. Running it on both
        would count a step twice; weights it freezes are perturbed but restored bit for bit.
        """
        sam = SAM(optimizer, rho=self.train.sam_rho, adaptive=self.train.sam_adaptive)
        sam.perturb()
        with frozen_batchnorm_stats(model):  # running statistics stay those of w, not w + e_w
            self._backward(model, strategy, optimizer, batch, terms)
        sam.restore()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, strategy: Strategy, dataset: Dataset, *,
                 num_classes: int, label: str = "eval") -> EvalResult:
        """Per-class accuracy of ``strategy.predict`` among all classes the head has."""
        model.eval()
        total = torch.zeros(num_classes, dtype=torch.long)
        correct: dict[str, torch.Tensor] = {}  # "" is predict's; the rest are variants
        bar = self.progress.bar(label, math.ceil(len(dataset) / self.train.eval_batch_size), transient=True)
        for x, y in self.batches(dataset, batch_size=self.train.eval_batch_size):
            with self._autocast():
                logits, variants = split_prediction(strategy.predict(model, x))
            total += torch.bincount(y.cpu(), minlength=num_classes)
            for name, out in {"": logits, **variants}.items():
                hit = (out.argmax(dim=1) == y).cpu().long()
                counts = torch.bincount(y.cpu(), weights=hit, minlength=num_classes).long()
                correct[name] = correct.get(name, 0) + counts
            bar.advance()
        bar.close()
        correct = {k: v.numpy() for k, v in correct.items()}
        main = correct.pop("", np.zeros(num_classes, dtype=np.int64))
        return EvalResult(main, total.numpy(), correct)

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        cfg = self.train
        params = parameter_groups(model, cfg)  # train.trainable / frozen / lr_scale
        # foreach: one kernel per step for all parameters; PyTorch only defaults to it on CUDA,
        # and on CPU it gives bit-identical updates, faster (many small tensors in a ViT).
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                   foreach=True)
        cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)

    def _schedule(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        if self.train.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.train.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()
