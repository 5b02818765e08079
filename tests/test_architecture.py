"""The layering DESIGN.md promises, checked on the source: no import cycles between clsim's
modules (imports inside functions count too: a lazy import is still a dependency), and the
lower layers do not import the higher ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "clsim"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, at any depth of the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {m: {n for n in imports_of(p) if n in MODULES and n != m} for m, p in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_between_clsim_modules():
    assert cycles(GRAPH) == []


def offenders(names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names for f in forbidden if n == f or n.startswith(f + "."))


@pytest.mark.parametrize("lower, forbidden", [
    ("clsim.learner", ("flwr", "clsim.federated", "clsim.experiment", "clsim.cli")),
    ("clsim.engine.engine", ("yaml", "clsim.config.parse", "clsim.config.checks", "clsim.federated", "clsim.learner")),
    ("clsim.metrics", ("flwr", "clsim.federated", "torch")),
    ("clsim.config.schema", ("clsim.config.parse", "clsim.config.checks", "clsim.registry", "yaml", "torch")),
    ("clsim.strategies.base", ("clsim.cli", "clsim.config", "clsim.federated", "clsim.learner")),
    ("clsim.federated.base", ("torch", "clsim.config")),  # read by config checks: a leaf (Flower only lazily)
])
def test_a_lower_layer_does_not_import_a_higher_one(lower, forbidden):
    assert not offenders(imports_of(MODULES[lower]), forbidden)


def test_validating_a_federated_config_and_loading_the_learner_import_no_flower():
    """Configs validate, and local runs start, without Flower: it is imported on first use only."""
    import subprocess
    import sys

    code = ("import sys; from clsim.config import load_config; import clsim.learner, clsim.experiment; "
            "load_config('scenarios/fed_digits.yaml'); "
            "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
