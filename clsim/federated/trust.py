"""What code a client runs: the node's own allow-list for the code the server's config names.

The experiment config travels from the server to every client, and building it imports what it
names: a plugin file (``strategy: {plugin: file.py:Class}``, any pluggable section) or a class
of an installed library (``strategy: {name: avalanche, plugin: EWCPlugin}``). On a real
federation that would let the server choose which code runs on the client's machine, so a
client builds a config only when every piece of code it names is allowed by the client's *own*
node config (``flower-supernode --node-config "... allow-code='...'"``)::

    allow-code='*'                                   everything (as in simulation)
    allow-code='avalanche:EWCPlugin,avalanche:LwFPlugin'   these Avalanche plugins
    allow-code='avalanche:*,/opt/clsim/plugins/*.py'       every Avalanche plugin, files there

Entries are comma-separated ``fnmatch`` patterns, matched against ``NAME:CLASS`` for a
registered factory's own ``plugin`` argument and against the file's path for a plugin file
(the path as the config names it, and the path it resolves to on this machine). Registered
clsim components are installed code and always allowed.

Deployment: empty unless the node config says otherwise. Simulation (the in-process engine and
Flower's simulation engine that ``clsim run`` starts): open, as server and clients are one
user's processes; :func:`trusting` marks them (an environment variable, which Ray's workers
are given through their runtime environment).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ALLOW_KEY = "allow-code"
"""The node-config key of the allow-list."""
SIMULATION_ENV = "CLSIM_SIMULATED_CLIENTS"
"""Set (to ``1``) in processes whose clients are the server's own user's: the list is open there."""

log = logging.getLogger("clsim.client")


class RefusedCode(PermissionError):
    """The server's config names code this node's allow-list does not admit."""


def requested_code(raw: Any, key: str = "") -> list[tuple[str, str]]:
    """``(config key, code)`` for every plugin a config names: ``NAME:CLASS`` for a registered
    factory's own ``plugin`` argument (Avalanche's), the file for a ``FILE.py:Class`` plugin."""
    found: list[tuple[str, str]] = []
    if isinstance(raw, Mapping):
        plugin = raw.get("plugin")
        if isinstance(plugin, str):
            found.append((f"{key}.plugin".lstrip("."), f"{raw['name']}:{plugin}" if "name" in raw else plugin))
        for k, v in raw.items():
            if k != "plugin":
                found += requested_code(v, f"{key}.{k}".lstrip("."))
    elif isinstance(raw, list):
        for i, v in enumerate(raw):
            found += requested_code(v, f"{key}[{i}]")
    return found


def allow_list(node_config: Mapping[str, Any]) -> list[str]:
    """The node's patterns (``['*']`` in simulation unless the node config sets its own)."""
    if ALLOW_KEY in node_config:
        return [p.strip() for p in str(node_config[ALLOW_KEY]).split(",") if p.strip()]
    return ["*"] if os.environ.get(SIMULATION_ENV) == "1" else []


def allowed(code: str, patterns: list[str]) -> bool:
    """Whether ``code`` (``NAME:CLASS`` or ``FILE.py:Class``) matches one of ``patterns``."""
    candidates = {code}
    file = _plugin_file(code)
    if file is not None:  # a plugin file: the file, as named and as it resolves here
        candidates |= {file, str(Path(file).expanduser().resolve())}
    return any(fnmatch.fnmatchcase(c, p) for c in candidates for p in patterns)


def check(text: str, node_config: Mapping[str, Any]) -> None:
    """Raise :class:`RefusedCode` (and log it) unless every piece of code ``text`` names is allowed."""
    patterns = allow_list(node_config)
    refused = [(key, code) for key, code in _requested(text) if not allowed(code, patterns)]
    if refused:
        key, code = refused[0]
        message = (f"this node does not run {code!r} ({key}): not in its node config's {ALLOW_KEY} "
                   f"({','.join(patterns) or 'empty'}); to allow it, start the SuperNode with "
                   f"--node-config \"... {ALLOW_KEY}='{_suggest(code)}'\"")
        log.error(message)
        raise RefusedCode(message)


@functools.lru_cache(maxsize=8)
def _requested(text: str) -> tuple[tuple[str, str], ...]:
    return tuple(requested_code(yaml.safe_load(text)))


def _plugin_file(code: str) -> str | None:
    """The file of a ``FILE.py:Class`` plugin; None for a ``NAME:CLASS`` one."""
    file, sep, _ = code.rpartition(":")
    return file if sep and file.endswith(".py") else None


def _suggest(code: str) -> str:
    return _plugin_file(code) or code


@contextlib.contextmanager
def trusting() -> Iterator[dict[str, str]]:
    """Mark this process (and the Ray workers it starts, given the yielded variables) as running
    simulated clients for their own user: the allow-list is open."""
    before = os.environ.get(SIMULATION_ENV)
    os.environ[SIMULATION_ENV] = "1"
    try:
        yield {SIMULATION_ENV: "1"}
    finally:
        if before is None:
            os.environ.pop(SIMULATION_ENV, None)
        else:
            os.environ[SIMULATION_ENV] = before
