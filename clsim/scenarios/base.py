"""The stream a learner sees: an ordered sequence of :class:`Experience` objects."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset


@dataclass(frozen=True)
class Experience:
    """One step of the stream.

    Attributes:
        index: position in the stream, from 0.
        classes: learner labels introduced here (learner label k is the k-th class of the
            scenario's class order, so experience i's classes follow experience i-1's).
        train: this step's training data (a view over the source; labels are learner labels).
        test: the test data of this step's classes.
    """

    index: int
    classes: tuple[int, ...]
    train: Dataset
    test: Dataset


@dataclass(frozen=True)
class Scenario:
    """An ordered sequence of experiences over one source.

    Attributes:
        experiences: the stream.
        class_order: source labels in learner order (``class_order[k]`` is learner label k).
        class_names: names in learner order.
        train_counts: training images per learner label (for head/medium/tail groups).
        input_shape: ``(C, H, W)`` of the images.
        long_tailed: training counts follow a long-tail profile (head/medium/tail reported).
    """

    experiences: tuple[Experience, ...]
    class_order: tuple[int, ...]
    class_names: tuple[str, ...]
    train_counts: np.ndarray
    input_shape: tuple[int, int, int]
    long_tailed: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    def __len__(self) -> int:
        return len(self.experiences)

    def seen_classes(self, index: int) -> int:
        """How many classes the learner has met after experience ``index``."""
        return sum(len(e.classes) for e in self.experiences[: index + 1])
