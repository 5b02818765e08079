"""What an install records and refuses: package versions for metrics.json, a binary config file."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from clsim import versions
from clsim.versions import package_versions

ROOT = Path(__file__).resolve().parents[1]


def _clsim(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m clsim.cli ARGS`` (or ``python -c CODE``) in a fresh interpreter."""
    argv = ["-c", code] if code is not None else ["-m", "clsim.cli", *args]
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_package_versions_match_the_installed_packages():
    found = package_versions()
    assert found["python"] == platform.python_version() == ".".join(map(str, sys.version_info[:3]))
    assert found["clsim"] == metadata.version("clsim")
    # The metadata agrees with what the imported modules say about themselves; torch's own
    # __version__ adds the build's local tag (2.14.1+cu130), pip's metadata (and constraints.txt) do not.
    assert found["torch"] == torch.__version__.split("+")[0]
    assert found["numpy"] == np.__version__
    assert set(found) <= {"python", *versions.PACKAGES}
    assert all(isinstance(v, str) and v[0].isdigit() for v in found.values())


def test_package_versions_omit_what_is_not_installed(monkeypatch):
    real = metadata.version

    def version(name: str) -> str:
        if name in ("flwr", "avalanche-lib"):
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(versions.metadata, "version", version)
    found = package_versions()
    assert "flwr" not in found and "avalanche-lib" not in found
    assert list(found) == ["python", "clsim", "torch", "torchvision", "timm", "numpy"]


def test_package_versions_import_neither_torch_nor_flwr():
    code = ("import sys; from clsim.versions import package_versions; v = package_versions(); "
            "print('torch' in v, 'torch' in sys.modules, 'flwr' in sys.modules)")
    result = _clsim(code=code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False", "False"]


def test_a_binary_config_file_is_one_line_exit_2(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(bytes(range(256)))  # 0x80 (offset 128) is the first byte that is not UTF-8
    result = _clsim("validate", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"clsim: error: {path}: not a text file (UTF-8)")
    assert "offset 128" in lines[0]
    assert result.stdout == ""


def test_a_nul_byte_in_a_text_config_is_one_line_exit_2(tmp_path):
    path = tmp_path / "nul.yaml"
    path.write_text("name: x\x00\n")  # valid UTF-8, but YAML forbids the character
    result = _clsim("validate", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines == [f"clsim: error: {path}: not valid YAML at character 7: special characters are not allowed"]
