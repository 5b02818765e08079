"""Batch-wise augmentations for in-memory sources, and the normalisation they share.

File-backed sources (CIFAR, ImageNet-R, image folders) use torchvision's per-image transforms
instead (see :mod:`clsim.data.vision`); these work on whole ``(B, C, H, W)`` batches so the
in-memory fast path never leaves tensor land.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class Compose:
    """Apply batch transforms in order."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t(x)
        return x


class RandomShift:
    """Pad by ``pad`` pixels (edge-replicated) and crop back at a random offset per image.

    The batch version of torchvision's ``RandomCrop(size, padding=pad)``.
    """

    def __init__(self, pad: int):
        self.pad = pad

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad <= 0:
            return x
        b, _, h, w = x.shape
        padded = F.pad(x, (self.pad,) * 4, mode="replicate")  # (B, C, H+2p, W+2p)
        dy = torch.randint(0, 2 * self.pad + 1, (b,))
        dx = torch.randint(0, 2 * self.pad + 1, (b,))
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (B, 1, H, 1)
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (B, 1, 1, W)
        batch = torch.arange(b)[:, None, None, None]
        chans = torch.arange(x.shape[1])[None, :, None, None]
        return padded[batch, chans, rows, cols]


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a ``(N, C, H, W)`` tensor to ``size`` x ``size`` (no-op if equal)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def standardize(
    train: torch.Tensor, test: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise both splits with the per-channel mean and std of the training split."""
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std
