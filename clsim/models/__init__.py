"""Models: the :class:`IncrementalClassifier` contract and the registered factories."""

from clsim.models import cifar_resnet, deit, small, timm_models  # noqa: F401  (registration)
from clsim.models import dhvt, gcab  # noqa: F401  (registration)
from clsim.models import prompt_vit  # noqa: F401  (registration)
from clsim.models.heads import IncrementalClassifier

__all__ = ["IncrementalClassifier"]
