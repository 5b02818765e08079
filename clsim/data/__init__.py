"""Data sources: the core types, and every built-in source registered in ``DATASETS``.

Importing this package registers ``digits`` and ``synthetic`` (:mod:`clsim.data.embedded`) and
``cifar10``, ``cifar100``, ``imagenet_r``, ``tiny_imagenet`` and ``image_folder``
(:mod:`clsim.data.vision`).
"""

from clsim.data import embedded, vision  # noqa: F401  (importing registers the sources)
from clsim.data.base import ArrayDataset, Source, View

__all__ = ["ArrayDataset", "Source", "View"]
