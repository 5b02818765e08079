"""Learning on the server's public set: a held-out validation part, epochs, selection on it.

FedConv (Shen et al., MobiSys 2024) trains its compression, dilation and aggregation, and
fine-tunes the global and the client models, on a public set the server holds. The public
code (github.com/lemingshen/FedConv, ``utils/federated_settings.py``) runs whole epochs over
it and keeps, per phase, the epoch with the best *test* accuracy minus test loss; here the
selection is on a validation part of the public set that no server learning ever trains on
(:func:`split_public`), never on the test set. The same machinery fine-tunes the global model
for every sub-model strategy (``finetune``), so HeteroFL and FedRolex can get exactly the
server fine-tuning FedConv gets, as its control.

Seeds are lists ``[run seed, *phase tags, epoch]`` fed to ``numpy.random.default_rng``, so every
batch order is a pure function of the config and a resumed run draws what a straight one does.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from clsim.errors import ConfigError

SPLIT_TAG = 17
"""Seed tag of the public set's train / validation split."""

Batch = tuple[torch.Tensor, torch.Tensor]


def split_public(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, validation)`` indices of a public set with labels ``y``, stratified by class.

    A class of n items gives ``round(fraction * n)`` of them to validation, at most n - 1 (a
    class with one item stays wholly in training, so server learning still sees every class).
    """
    labels = y.cpu().numpy()
    train, val = [], []
    for c in np.unique(labels):
        items = np.flatnonzero(labels == c)
        items = items[np.random.default_rng([seed, SPLIT_TAG, int(c)]).permutation(len(items))]
        k = min(int(math.floor(fraction * len(items) + 0.5)), len(items) - 1)
        val.append(items[:k])
        train.append(items[k:])
    as_index = lambda parts: torch.as_tensor(np.sort(np.concatenate(parts)) if parts else np.zeros(0, int))  # noqa: E731
    return as_index(train), as_index(val)


@dataclass
class Phase:
    """What one learning phase on the public set did (losses are per-batch cross-entropies).

    Attributes:
        train_first, train_last: training loss of the first and the last batch (nan: nothing learnt).
        val_start, val_best: validation loss before learning and at the kept epoch (nan: no validation part).
        best_epoch: the kept epoch (0: the starting point was never beaten).
        epochs: epochs run (fewer than asked when ``patience`` stopped the phase).
    """

    train_first: float
    train_last: float
    val_start: float
    val_best: float
    best_epoch: int
    epochs: int


def learn(groups: list[dict], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
          val_fn: Callable[[], float] | None, train: Batch, *, epochs: int | None, steps: int | None,
          batch_size: int, seed: Sequence[int], patience: int | None = None) -> Phase:
    """Adam on ``groups`` (torch param groups, each with its ``lr``) over the public ``train`` part.

    ``epochs``: that many shuffled passes in batches of ``batch_size``; ``steps``: one "epoch" of
    that many random batches (the bounded budget of earlier versions). With ``val_fn``, the
    parameters end at the epoch (0 = the start) with the lowest validation loss, and
    ``patience`` epochs without improvement stop the phase early.
    """
    params = [p for g in groups for p in g["params"]]
    rounds = steps if epochs is None else epochs
    if not params or not rounds or len(train[1]) == 0:
        return Phase(math.nan, math.nan, math.nan, math.nan, 0, 0)
    optimizer = torch.optim.Adam(groups)
    best = val_start = val_fn() if val_fn else math.nan
    kept = [p.detach().clone() for p in params] if val_fn else None  # the best epoch's parameters
    best_epoch, losses, done = 0, [], 0
    for epoch in range(1, (1 if epochs is None else epochs) + 1):
        for xb, yb in _batches(train, epochs, steps, batch_size, [*seed, epoch]):
            optimizer.zero_grad()
            loss = loss_fn(xb, yb)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        done = epoch
        if val_fn is None:
            continue
        current = val_fn()
        if current < best:
            best, best_epoch, kept = current, epoch, [p.detach().clone() for p in params]
        elif patience is not None and epoch - best_epoch >= patience:
            break
    if kept is not None and best_epoch != done:
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)
    return Phase(losses[0], losses[-1], val_start, best, best_epoch, done)


def _batches(train: Batch, epochs: int | None, steps: int | None, batch_size: int,
             seed: list[int]) -> Iterator[Batch]:
    x, y = train
    if epochs is None:  # steps random batches, each a pure function of its seed
        for step in range(steps):
            idx = np.random.default_rng([*seed[:-1], step]).choice(len(y), size=min(batch_size, len(y)), replace=False)
            yield x[torch.as_tensor(idx)], y[torch.as_tensor(idx)]
        return
    order = torch.as_tensor(np.random.default_rng(seed).permutation(len(y)))
    for start in range(0, len(y), batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


def forward(model: torch.nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with ``state`` as its weights (differentiable in them); training-mode
    BatchNorm normalises by batch statistics and updates copies of the running ones."""
    model.train()
    bound = {k: v if v.requires_grad or v.grad_fn is not None else v.clone() for k, v in state.items()}
    return functional_call(model, bound, (x,))


def validation_loss(model: torch.nn.Module, state: Callable[[], dict[str, torch.Tensor]],
                    val: Batch) -> Callable[[], float]:
    """The cross-entropy of ``model`` with weights ``state()`` on the whole validation part.

    BatchNorm uses the validation part's batch statistics, as training does: the running
    statistics are not learnt on the server (and under sBN are recomputed after aggregation),
    so they would make the selection depend on buffers the phase cannot change.
    """
    def loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(forward(model, state(), val[0]), val[1]))
    return loss


@contextlib.contextmanager
def server_threads(threads: int = 1) -> Iterator[None]:
    """Server learning on one torch thread: its many small convolutions run slower with more
    (measured: 30 ms vs 0.25 ms per grouped conv step on 2 shared cores), and the float sums,
    so the learnt weights, do not then depend on the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_int(key: str, value: object, low: int, *, none: bool = False) -> None:
    """A one-line :class:`ConfigError` on ``federated.server.<key>`` unless ``value`` is an int >= ``low``."""
    if none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"federated.server.{key}", f"expected an int >= {low}{' or null' if none else ''}, got {value!r}")


def check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    """A one-line :class:`ConfigError` on ``federated.server.<key>`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"federated.server.{key}", f"expected one of {', '.join(map(repr, choices))}, got {value!r}")


def check_rate(key: str, value: object) -> None:
    """A one-line :class:`ConfigError` unless ``value`` is a finite number > 0 (an infinite
    learning rate turns every weight into NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"federated.server.{key}", f"expected a finite number > 0, got {value!r}")
