"""Scenario builders over a :class:`~clsim.data.base.Source`."""

from clsim.scenarios import builders  # noqa: F401  (registration)
from clsim.scenarios.base import Experience, Scenario

__all__ = ["Experience", "Scenario"]
