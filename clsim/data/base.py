"""Core data types: a :class:`Source` (train + test data set) and index views over it.

Every data set in a Source exposes ``targets`` (one int label per item) so that scenario
builders can select classes and counts without loading a single image. Experiences are
:class:`View` objects over the Source's data sets: the data is loaded once and indexed, never
copied per task.

In-memory sources (digits, synthetic) use :class:`ArrayDataset`, which also serves whole
batches by tensor indexing (``get_batch``); the engine uses that fast path instead of a
per-item ``DataLoader`` when every data set in the chain supports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

BatchTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Source:
    """A train and a test data set of ``(image tensor (C, H, W), int label)`` pairs.

    Attributes:
        name: the registered name it was built from.
        train: training data; must expose ``targets``.
        test: test data; must expose ``targets``.
        class_names: one name per label, index = label.
        input_shape: ``(channels, height, width)`` of the tensors the data sets yield.
    """

    name: str
    train: Dataset
    test: Dataset
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def targets(self, split: str) -> np.ndarray:
        """Labels of ``split`` ("train" or "test") as an int64 array, without loading images."""
        return np.asarray(getattr(self, split).targets, dtype=np.int64)


class ArrayDataset(Dataset):
    """Images held in memory as one float tensor, with an optional batch-wise transform.

    Args:
        images: ``(N, C, H, W)`` float32, already normalised.
        targets: ``(N,)`` int labels.
        transform: applied to ``(B, C, H, W)`` batches (a single item is a batch of one);
            random augmentations draw from torch's global generator, which the engine seeds.
    """

    supports_batches = True

    def __init__(
        self,
        images: torch.Tensor,
        targets: Sequence[int] | np.ndarray | torch.Tensor,
        *,
        transform: BatchTransform | None = None,
    ):
        self.images = images
        self._targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        if len(self.images) != len(self._targets):
            raise ValueError(f"{len(images)} images but {len(self._targets)} targets")
        self.transform = transform

    @property
    def targets(self) -> np.ndarray:
        return self._targets.numpy()

    def __len__(self) -> int:
        return len(self._targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.get_batch(torch.tensor([i]))
        return x[0], int(y[0])

    def get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x (B, C, H, W), y (B,))`` for the items at ``idx``, transformed as a batch."""
        x = self.images[idx]
        return (self.transform(x) if self.transform else x), self._targets[idx]


class View(Dataset):
    """Items ``indices`` of ``base``, labels passed through ``label_map``; no data is copied.

    ``label_map[original_label]`` is the label the learner sees: scenario builders map the
    class order onto 0..C-1 so that a growing classifier head's first k outputs are the k
    classes seen so far.
    """

    def __init__(self, base: Dataset, indices: np.ndarray, label_map: np.ndarray | None = None):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.label_map = None if label_map is None else np.asarray(label_map, dtype=np.int64)

    @property
    def targets(self) -> np.ndarray:
        raw = np.asarray(self.base.targets, dtype=np.int64)[self.indices]
        return raw if self.label_map is None else self.label_map[raw]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.base[int(self.indices[i])]
        return x, int(y if self.label_map is None else self.label_map[y])

    @property
    def supports_batches(self) -> bool:
        return supports_batches(self.base)

    def get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base.get_batch(torch.from_numpy(self.indices[idx.numpy()]))
        if self.label_map is not None:
            y = torch.from_numpy(self.label_map[y.numpy()])
        return x, y


class ConcatView(Dataset):
    """Several views read as one data set (used by the ``joint`` strategy); no copy."""

    def __init__(self, parts: Sequence[Dataset]):
        self.parts = list(parts)
        self._offsets = np.cumsum([0] + [len(p) for p in self.parts])

    @property
    def targets(self) -> np.ndarray:
        return np.concatenate([np.asarray(p.targets, dtype=np.int64) for p in self.parts])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        part = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return self.parts[part][i - int(self._offsets[part])]

    @property
    def supports_batches(self) -> bool:
        return all(supports_batches(p) for p in self.parts)

    def get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx_np = idx.numpy()
        part_of = np.searchsorted(self._offsets, idx_np, side="right") - 1
        x_out: torch.Tensor | None = None
        y_out = torch.empty(len(idx_np), dtype=torch.long)
        for part in np.unique(part_of):
            rows = torch.from_numpy(np.nonzero(part_of == part)[0])
            x, y = self.parts[part].get_batch(torch.from_numpy(idx_np[rows.numpy()] - self._offsets[part]))
            if x_out is None:
                x_out = x.new_empty((len(idx_np), *x.shape[1:]))
            x_out[rows], y_out[rows] = x, y
        if x_out is None:
            raise ValueError("empty batch")
        return x_out, y_out


def supports_batches(dataset: Dataset) -> bool:
    """Whether ``dataset`` serves whole batches by tensor indexing (the engine's fast path)."""
    return bool(getattr(dataset, "supports_batches", False))


def stratified_split(
    targets: np.ndarray, test_fraction: float, seed: int | list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """A stratified train/test index split, fixed by ``seed`` (an int or a list of ints)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(targets):
        idx = rng.permutation(np.nonzero(targets == c)[0])
        n_test = max(1, int(round(len(idx) * test_fraction)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
