"""Pieces the evidence benchmarks share (deit_lt.py, dhvt.py): a run folder with nothing in it,
so every row is trained from scratch, and mean +- std over seeds."""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path


def fresh_out(out: str | None, prefix: str) -> Path:
    """``out`` if it is new or empty (else exit 2: no cached runs), or a new temp dir."""
    if out is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    path = Path(out)
    if path.exists() and any(path.iterdir()):
        print(f"error: --out: {path} is not empty; the benchmark trains every run from scratch "
              f"(give a new or empty folder)", file=sys.stderr)
        raise SystemExit(2)
    return path


def mean_std(values: list[float | None]) -> dict[str, float] | None:
    """Mean and sample std (0 for one value) of the values that are not None; None if none are."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
