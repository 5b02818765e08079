"""Errors that the CLI turns into one line on stderr and exit code 2.

Anything wrong with what the user gave us (a config key, a value, a path, a missing data set)
raises :class:`ConfigError`. Everything else is a bug or an environment failure (exit 1).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(Exception):
    """The user's input is wrong. ``path`` names the config key or file at fault."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class DataNotFoundError(ConfigError):
    """A data set is not where clsim looked; the message says where and how to get it."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean 'x'?)' suffix for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
