"""The versions of Python and of the packages a result depends on, for a run's metrics.json.

Read from the installed distributions' metadata (``importlib.metadata``), never by importing the
packages: importing torch or flwr takes seconds, reading their METADATA takes milliseconds.
"""

from __future__ import annotations

import platform
from importlib import metadata

# Distribution names (as pip spells them), in the order they are reported: clsim itself, the
# numerical stack a number comes from, then the optional federation and Avalanche extras.
PACKAGES = ("clsim", "torch", "torchvision", "timm", "numpy", "flwr", "avalanche-lib")


def package_versions() -> dict[str, str]:
    """``{"python": "3.11.7", "clsim": "0.1.0", "torch": ..., ...}``; packages not installed are omitted."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
