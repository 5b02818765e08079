"""Run folders (metrics, CSV, curves, report), their plots, and side-by-side comparison."""

from clsim.report.compare import compare_runs
from clsim.report.run_folder import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_run,
    write_results,
)

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "compare_runs",
           "read_run", "write_results"]
