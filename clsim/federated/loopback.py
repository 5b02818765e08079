"""Flower's deployment engine on one machine: free ports, the ``flwr`` CLI's home, and the
SuperLink / SuperNode / worker processes, each stopped with its children.

What the README's "Run on a real Flower federation" recipe does by hand, for the tests that
run it on loopback and for ``benchmarks/federated_deploy.py`` (one copy for all of them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
"""Where this environment's ``flwr``, ``flower-superlink`` and ``flower-supernode`` live."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, seconds: float = 90.0) -> None:
    """Return once something accepts connections on 127.0.0.1:``port``; TimeoutError after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds:.0f} s")


def flwr_env(home: Path, federation: str, link: int, *, root_certificates: Path | None = None,
             base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for ``flwr`` commands against the SuperLink on ``link``: a FLWR_HOME whose
    ``config.toml`` names it as ``federation`` (TLS with ``root_certificates``, else insecure),
    this environment's executables first on PATH. ``base``: the environment to extend (default os.environ)."""
    home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    (home / "config.toml").write_text(f'[superlink.{federation}]\naddress = "127.0.0.1:{link}"\n{security}\n')
    base = dict(os.environ) if base is None else base
    return base | {"FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
                   "PATH": f"{BIN}{os.pathsep}{base.get('PATH', '')}"}


class Processes:
    """Named processes, each in its own session, its output in ``<folder>/<name>.log``;
    :meth:`stop` ends each with its children (its process group: Flower's SuperExec and apps)."""

    def __init__(self, folder: Path, env: dict[str, str]):
        self.folder, self.env = folder, env
        self.procs: dict[str, tuple[subprocess.Popen, object]] = {}

    def start(self, name: str, *cmd: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115  # closed in stop()
        proc = subprocess.Popen(cmd, cwd=self.folder, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = (proc, log)
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc, _ in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, log in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
            log.close()
