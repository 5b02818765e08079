"""Models: the :class:`IncrementalClassifier` contract and the registered factories."""

from clsim.models import deit, small, timm_models  # noqa: F401  (registration)
from clsim.models.heads import IncrementalClassifier

__all__ = ["IncrementalClassifier"]
