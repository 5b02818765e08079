"""What trains, and how fast: ``train.trainable`` / ``train.frozen`` / ``train.lr_scale``.

Applied where the optimizer is built (:meth:`clsim.engine.engine.Engine.fit`, once per
experience, after the head has grown), so every strategy and every federated client trains
exactly the selected parameters. Frozen parameters get ``requires_grad = False``: no gradient is
computed for them, and weight decay or momentum cannot move them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from clsim.config.schema import TrainConfig
from clsim.errors import ConfigError


def _matches(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def check_globs(model: nn.Module, train: TrainConfig) -> None:
    """Every glob of ``trainable``, ``frozen`` and ``lr_scale`` matches some parameter of
    ``model``, and something is left to train; a :class:`ConfigError` naming the glob otherwise."""
    names = [n for n, _ in model.named_parameters()]
    for key, globs in (("trainable", train.trainable or []), ("frozen", train.frozen), ("lr_scale", list(train.lr_scale))):
        for glob in globs:
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                raise ConfigError(f"train.{key}", f"'{glob}' matches no parameter of the model; "
                                                  f"its parameters look like {', '.join(names[:3])}, ..., {names[-1]}")
    if not any(trains(n, train) for n in names):
        raise ConfigError("train.frozen", "freezes every parameter the 'trainable' globs select: nothing would train")


def trains(name: str, train: TrainConfig) -> bool:
    """Whether parameter ``name`` trains under ``train``'s selection."""
    selected = train.trainable is None or _matches(name, train.trainable)
    return selected and not _matches(name, train.frozen)


def lr_factor(name: str, train: TrainConfig) -> float:
    """The learning-rate multiplier of parameter ``name``: the first matching glob's, else 1."""
    return next((f for g, f in train.lr_scale.items() if fnmatch.fnmatchcase(name, g)), 1.0)


def parameter_groups(model: nn.Module, train: TrainConfig) -> list[dict]:
    """Freeze what does not train and group the rest by learning rate: the optimizer's groups.

    A parameter a strategy froze itself (``requires_grad`` False on entry) stays frozen.
    Without a selection or scales this is one group of all trainable parameters, in model order.
    """
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not trains(name, train):
            p.requires_grad_(False)
            continue
        groups.setdefault(lr_factor(name, train), []).append(p)
    return [{"params": params, "lr": train.lr * factor} for factor, params in groups.items()]
