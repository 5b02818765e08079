"""Joint training on all data seen so far: the upper bound of a continual learner."""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import Dataset

from clsim.data.base import ConcatView
from clsim.registry import STRATEGIES
from clsim.scenarios.base import Experience
from clsim.strategies.base import Strategy


@STRATEGIES.register("joint")
class Joint(Strategy):
    """Upper bound: at each experience, train on the union of all training data seen so far."""

    def train_dataset(self, experience: Experience, past: Sequence[Experience]) -> Dataset:
        return ConcatView([e.train for e in (*past, experience)])
