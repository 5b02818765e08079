"""Small hand-written models for quick runs (timm has no MLP or tiny CNN for 8x8 inputs)."""

from __future__ import annotations

import math

from torch import nn

from clsim.errors import ConfigError
from clsim.models.heads import IncrementalClassifier
from clsim.registry import MODELS


@MODELS.register("mlp")
def mlp(
    input_shape: tuple[int, int, int], /, *, hidden: list[int] = [256, 256], dropout: float = 0.0
) -> IncrementalClassifier:
    """A multi-layer perceptron on flattened pixels, for quick runs.

    Args:
        hidden: width of each hidden layer.
        dropout: dropout probability after each hidden layer.
    """
    if not hidden or min(hidden) < 1:
        raise ConfigError("model.hidden", f"expected a non-empty list of ints >= 1, got {hidden}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    return IncrementalClassifier(nn.Sequential(*layers), width)


@MODELS.register("cnn")
def cnn(
    input_shape: tuple[int, int, int], /, *, channels: list[int] = [32, 64], hidden: int = 128
) -> IncrementalClassifier:
    """A small CNN (3x3 conv - BN - ReLU blocks, 2x downsampling between them, global pool).

    Args:
        channels: output channels of each conv block.
        hidden: width of the fully connected layer before the head.
    """
    if not channels or min(channels) < 1:
        raise ConfigError("model.channels", f"expected a non-empty list of ints >= 1, got {channels}")
    layers: list[nn.Module] = []
    width = input_shape[0]
    for i, c in enumerate(channels):
        layers += [nn.Conv2d(width, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
        if i < len(channels) - 1:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        width = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, hidden), nn.ReLU()]
    return IncrementalClassifier(nn.Sequential(*layers), hidden)
