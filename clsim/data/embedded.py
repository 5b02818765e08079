"""Sources that need no download: scikit-learn's bundled ``digits`` and generated ``synthetic``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clsim.data.base import ArrayDataset, Source, stratified_split
from clsim.data.transforms import Compose, RandomShift, resize, standardize
from clsim.errors import ConfigError
from clsim.registry import DATASETS

VALIDATION_SPLIT = 1
"""Second entry of the validation split's seed, ``[split_seed, VALIDATION_SPLIT]`` (apart from the test split's)."""


def _in_memory_source(
    name: str,
    images: torch.Tensor,
    targets: np.ndarray,
    class_names: tuple[str, ...],
    *,
    test_fraction: float,
    split_seed: int,
    shift: int,
    validation_fraction: float = 0.0,
) -> Source:
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError("data.test_fraction", f"expected a number in (0, 1), got {test_fraction}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ConfigError("data.validation_fraction", f"expected a number in [0, 1), got {validation_fraction}")
    train_idx, test_idx = stratified_split(targets, test_fraction, split_seed)
    if validation_fraction > 0:
        # tuning: evaluate on a part of the training images, so the test set never picks a setting
        keep, held = stratified_split(targets[train_idx], validation_fraction, [split_seed, VALIDATION_SPLIT])
        train_idx, test_idx = train_idx[keep], train_idx[held]
    x_train, x_test = standardize(images[train_idx], images[test_idx])
    augment = Compose([RandomShift(shift)]) if shift > 0 else None
    return Source(
        name=name,
        train=ArrayDataset(x_train, targets[train_idx], transform=augment),
        test=ArrayDataset(x_test, targets[test_idx]),
        class_names=class_names,
        input_shape=tuple(images.shape[1:]),
    )


@DATASETS.register("digits")
def digits(
    *, image_size: int = 8, test_fraction: float = 0.2, split_seed: int = 0, shift: int = 1,
    validation_fraction: float = 0.0,
) -> Source:
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 grey images, 10 classes.

    Args:
        image_size: side in pixels the images are resized to (8 keeps the originals).
        test_fraction: share of each class held out for testing.
        split_seed: seed of the stratified train/test split.
        shift: train augmentation, random translation by up to this many pixels (0 = none).
        validation_fraction: 0 (default): the test set is the held-out test split. > 0: a
            tuning run: this share of each class's training images is held out and serves as
            the test set instead (the test split is neither trained on nor evaluated).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8)
    if image_size < 8:
        raise ConfigError("data.image_size", f"expected an int >= 8, got {image_size}")
    images = resize(images, image_size)
    names = tuple(str(int(n)) for n in bunch.target_names)
    return _in_memory_source(
        "digits", images, bunch.target.astype(np.int64), names,
        test_fraction=test_fraction, split_seed=split_seed, shift=shift,
        validation_fraction=validation_fraction,
    )


def _smooth_fields(gen: torch.Generator, n: int, channels: int, size: int, grain: int) -> torch.Tensor:
    """``n`` random smooth images: coarse ``grain`` x ``grain`` noise upsampled. (n, C, H, W)."""
    coarse = torch.randn(n, channels, grain, grain, generator=gen)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def make_synthetic(
    *,
    num_classes: int,
    samples_per_class: int,
    image_size: int,
    channels: int,
    prototypes_per_class: int,
    max_shift: int,
    noise: float,
    seed: int,
) -> tuple[torch.Tensor, np.ndarray]:
    """Generate ``(images (N, C, H, W), labels (N,))``.

    Each class is a mixture of smooth random prototypes. A sample is one prototype, circularly
    translated by up to ``max_shift`` pixels, scaled by a random contrast, plus pixel noise.
    The translations make classes overlap in pixel space, so a linear model on pixels stays
    well below what a convolutional or attention model reaches (tested).
    """
    gen = torch.Generator().manual_seed(seed)
    protos = _smooth_fields(gen, num_classes * prototypes_per_class, channels, image_size, 4)
    protos = protos / protos.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    n = num_classes * samples_per_class
    labels = torch.arange(num_classes).repeat_interleave(samples_per_class)
    which = labels * prototypes_per_class + torch.randint(
        0, prototypes_per_class, (n,), generator=gen
    )
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=gen)
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gen)
    images = torch.stack(
        [torch.roll(protos[w], shifts=(int(s[0]), int(s[1])), dims=(1, 2)) for w, s in zip(which, shifts)]
    )
    images = contrast * images + noise * torch.randn(images.shape, generator=gen)
    return images, labels.numpy().astype(np.int64)


@DATASETS.register("synthetic")
def synthetic(
    *,
    num_classes: int = 10,
    samples_per_class: int = 200,
    image_size: int = 16,
    channels: int = 3,
    prototypes_per_class: int = 2,
    max_shift: int | None = None,
    noise: float = 0.5,
    test_fraction: float = 0.2,
    validation_fraction: float = 0.0,
    seed: int = 0,
) -> Source:
    """Generated images: any number of classes, size and channels; deterministic by seed.

    Args:
        num_classes: number of classes.
        samples_per_class: images per class, before the train/test split.
        image_size: side in pixels.
        channels: image channels.
        prototypes_per_class: smooth patterns each class mixes (more = harder).
        max_shift: largest random translation in pixels; default image_size // 2, i.e. any
            position, which keeps a linear model on pixels near 0.5 accuracy (tested).
        noise: standard deviation of the pixel noise, relative to the pattern's.
        test_fraction: share of each class held out for testing.
        validation_fraction: 0 (default): the test set is the held-out test split. > 0: a
            tuning run: this share of each class's training images is held out and serves as
            the test set instead (the test split is neither trained on nor evaluated).
        seed: generator seed; the same seed always gives the same images and split.
    """
    max_shift = image_size // 2 if max_shift is None else max_shift
    for key, value, low in [
        ("num_classes", num_classes, 2), ("samples_per_class", samples_per_class, 2),
        ("image_size", image_size, 4), ("channels", channels, 1),
        ("prototypes_per_class", prototypes_per_class, 1), ("max_shift", max_shift, 0),
    ]:
        if value < low:
            raise ConfigError(f"data.{key}", f"expected an int >= {low}, got {value}")
    if noise < 0:
        raise ConfigError("data.noise", f"expected a number >= 0, got {noise}")
    images, labels = make_synthetic(
        num_classes=num_classes, samples_per_class=samples_per_class, image_size=image_size,
        channels=channels, prototypes_per_class=prototypes_per_class, max_shift=max_shift,
        noise=noise, seed=seed,
    )
    names = tuple(f"class_{c:03d}" for c in range(num_classes))
    return _in_memory_source(
        "synthetic", images, labels, names,
        test_fraction=test_fraction, split_seed=seed, shift=0,
        validation_fraction=validation_fraction,
    )
