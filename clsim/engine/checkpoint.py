"""Checkpoints at experience boundaries, and the one safe way clsim reads any ``.pt`` file.

Every file clsim reads back (its own checkpoints and client states, a teacher's weights, a
``pretrained:`` file, a run folder from a colleague) goes through :func:`load_file`:
``torch.load(..., weights_only=True)`` or safetensors, never pickle, because unpickling a file
can run any code it names. So clsim also *writes* only what such a load accepts: tensors and
plain containers (dict, list, tuple, set, int, float, str, bool, None). :func:`to_plain` turns
the numpy arrays that strategy and server states hold (Flower's optimisers keep NumPy moments)
into tagged tensors at save time and :func:`from_plain` gives them back, bit for bit, on load.
Checkpoints are written atomically (:mod:`clsim.atomic`), so a kill never leaves half of one.
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clsim.atomic import atomic_write
from clsim.errors import ConfigError


@dataclass
class RunState:
    """What a run has done so far; enough, with the model and strategy, to continue it.

    Attributes:
        next_experience: index of the first experience not yet trained.
        rows: accuracy-matrix rows so far (row i: after experience i; None = not measured).
        final_correct / final_total: per-class test counts of the latest evaluation.
        elapsed_s: wall time spent before this process (accumulates over resumes).
        losses: last-epoch mean training loss of each experience.
        variant_rows / variant_correct: the same rows and final per-class correct counts for each
            of the strategy's prediction variants (:meth:`Strategy.predict_with_variants`).
        train_steps: optimisation steps taken so far (the x axis of tracked step losses).
    """

    next_experience: int = 0
    rows: list[list[float | None]] = field(default_factory=list)
    final_correct: list[int] = field(default_factory=list)
    final_total: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    variant_rows: dict[str, list[list[float | None]]] = field(default_factory=dict)
    variant_correct: dict[str, list[int]] = field(default_factory=dict)
    train_steps: int = 0


CHECKPOINT_KEY = "--resume"
RESUME_ADVICE = "; restore it from a copy, or run again into another --out"


def save_checkpoint(path: Path, *, state: RunState, model: torch.nn.Module, strategy_state: dict[str, Any]) -> None:
    """Write ``path`` atomically (see :mod:`clsim.atomic`), in plain containers (:func:`save_plain`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"run": asdict(state), "num_classes": model.num_classes,
               "model": model.state_dict(), "strategy": strategy_state}
    save_plain(path, payload)


def load_checkpoint(path: Path, map_location: torch.device | str) -> dict[str, Any]:
    """The payload of :func:`save_checkpoint`, with ``run`` as a :class:`RunState`.

    Raises :class:`ConfigError` (key ``--resume``, naming the file) when the file is truncated,
    corrupt, not a clsim checkpoint, or needs pickle.
    """
    payload = load_plain(path, key=CHECKPOINT_KEY, map_location=map_location, advice=RESUME_ADVICE)
    try:
        payload["run"] = RunState(**payload["run"])
    except (TypeError, KeyError) as exc:  # a readable file, but not one save_checkpoint wrote
        raise ConfigError(CHECKPOINT_KEY, f"{path} is not a clsim checkpoint ({type(exc).__name__}: "
                                          f"{exc}){RESUME_ADVICE}") from None
    return payload


# ---------------------------------------------------------------- plain containers

_NUMPY = "__clsim_numpy__"  # tag of an encoded numpy array or scalar (a key no state dict uses)
_LEAVES = (str, bytes, int, float, complex, bool, type(None), torch.Tensor, torch.Size, torch.device, torch.dtype)


def to_plain(obj: Any, where: str = "") -> Any:
    """``obj`` with every numpy array / scalar as a tagged tensor, ready for a weights-only load.

    Raises TypeError (a bug in what clsim saves, not user input) for any other object, at save
    time, rather than writing a checkpoint that ``--resume`` could not read.
    """
    if isinstance(obj, np.ndarray | np.generic):  # first: np.float64 is also a float
        return _encode_numpy(obj)
    if isinstance(obj, _LEAVES):
        return obj
    if type(obj) in (dict, OrderedDict):  # OrderedDict: a module's state_dict, with its _metadata
        plain = type(obj)((k, to_plain(v, f"{where}.{k}")) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            plain._metadata = obj._metadata
        return plain
    if type(obj) in (list, tuple, set, frozenset):
        return type(obj)(to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"cannot checkpoint a {type(obj).__qualname__} at '{where or '<root>'}': clsim saves only "
                    f"tensors, numpy arrays and plain containers, so that a weights-only load reads it")


def from_plain(obj: Any) -> Any:
    """Inverse of :func:`to_plain`: tagged entries back to the numpy arrays / scalars they were."""
    if isinstance(obj, dict):
        if _NUMPY in obj:
            return _decode_numpy(obj)
        decoded = type(obj)((k, from_plain(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            decoded._metadata = obj._metadata
        return decoded
    if type(obj) in (list, tuple):
        return type(obj)(from_plain(v) for v in obj)
    return obj


def _encode_numpy(obj: np.ndarray | np.generic) -> dict[str, Any]:
    array = np.asarray(obj)
    kind = "scalar" if isinstance(obj, np.generic) else "array"
    try:
        data = torch.from_numpy(np.array(array, order="C"))  # exact bits; a copy: no aliasing
    except (TypeError, ValueError):  # a dtype torch has no tensor for (strings, big-endian): lists
        data = to_plain(array.tolist())
    return {_NUMPY: kind, "dtype": array.dtype.str, "shape": list(array.shape), "data": data}


def _decode_numpy(obj: dict[str, Any]) -> np.ndarray | np.generic:
    data = obj["data"]
    array = data.cpu().numpy() if isinstance(data, torch.Tensor) else np.array(data, dtype=np.dtype(obj["dtype"]))
    array = array.astype(np.dtype(obj["dtype"]), copy=False).reshape(obj["shape"])
    return array[()] if obj[_NUMPY] == "scalar" else array


def save_plain(path: str | Path, payload: Any) -> None:
    """``torch.save(to_plain(payload))`` atomically: a file :func:`load_plain` reads without pickle."""
    plain = to_plain(payload)
    atomic_write(path, lambda f: torch.save(plain, f))


def load_plain(path: str | Path, *, key: str, map_location: torch.device | str = "cpu", advice: str = "") -> Any:
    """A file of :func:`save_plain` (clsim's own: checkpoints, client and server states), decoded.

    Failures are :func:`load_file`'s one-line :class:`ConfigError` under ``key``.
    """
    return from_plain(load_file(path, key=key, map_location=map_location, own=True, advice=advice))


# ---------------------------------------------------------------- reading any file safely

_GLOBAL = re.compile(r"Unsupported (?:global: GLOBAL |class )([\w.]+)")


def load_file(path: str | Path, *, key: str, map_location: torch.device | str = "cpu", own: bool = False,
              advice: str = "") -> Any:
    """Read a ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors`` file.

    Never unpickles: a file that needs pickle (a whole pickled model, numpy arrays, an argparse
    Namespace, ...) is refused. Every failure is one :class:`ConfigError` under ``key`` naming
    the file: needs pickle (with a one-line conversion the user can run if they trust the file),
    missing, or truncated/corrupt. ``own``: a file clsim writes (checkpoint, client/server
    state), which gets clsim's conversion hint rather than the one for a weights file.
    ``advice`` ends the message for an unreadable file (what to do about it).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(key, f"{path} not found" if not path.exists() else f"{path} is a folder, expected a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file as load_safetensors

            return load_safetensors(str(path), device=str(map_location))
        return torch.load(path, map_location=map_location, weights_only=True)
    except (torch.cuda.OutOfMemoryError, MemoryError):
        raise  # the machine's limits, not the file's fault
    except Exception as exc:  # noqa: BLE001 -- torch/safetensors raise many types for a bad file
        needs = _needed_global(exc)
        if needs is not None:
            raise ConfigError(key, f"{path} needs pickle to load (it holds {needs}), and unpickling can run "
                                   f"any code, so clsim reads only tensors and plain containers; if you trust "
                                   f"the file, convert it once: {_convert_hint(path, own)}") from None
        raise ConfigError(key, f"{path} cannot be read, truncated or corrupt? "
                               f"({type(exc).__name__}: {_first_line(exc)}){advice}") from None


def _needed_global(exc: Exception) -> str | None:
    """The Python object a weights-only load refused (``pickle.UnpicklingError``), else None."""
    if not isinstance(exc, pickle.UnpicklingError):
        return None
    found = _GLOBAL.search(str(exc))
    return found.group(1) if found else None


def _convert_hint(path: Path, own: bool) -> str:
    """A ``python -c`` line that re-saves ``path`` as plain tensors (load it once with pickle)."""
    src = repr(str(path))
    if own:  # clsim's own file from an older clsim: the same payload, numpy arrays encoded
        return (f'python -c "import torch; from clsim.engine.checkpoint import to_plain; p = {src}; '
                f'torch.save(to_plain(torch.load(p, weights_only=False)), p)"')
    dst = path.with_name(f"{path.stem}.weights.pt")  # a whole model or a training checkpoint -> its weights
    return (f'python -c "import torch; m = torch.load({src}, weights_only=False); '
            f"m = m.get('model', m.get('state_dict', m)) if isinstance(m, dict) else m; "
            f"torch.save(m.state_dict() if hasattr(m, 'state_dict') else m, {str(dst)!r})\" "
            f"and use {dst} instead")


def _first_line(exc: BaseException) -> str:
    """The first sentence of an error, without terminal colour codes, cut to a readable length."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    line = text[0].split(". ")[0] if text else "no message"
    return line if len(line) <= 160 else line[:157] + "..."
