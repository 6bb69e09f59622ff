"""The package's shape: no import cycle between its modules, lazy imports inside functions included; every
third-party package it imports declared in pyproject.toml."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "runner"


def absolute_imports(path: Path) -> set[str]:
    """Every module a file imports by absolute name, at its top or inside a function; ``from runner import x``
    counts as ``runner.x`` too, as x may be a submodule."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return found


def imported_modules(path: Path) -> set[str]:
    """Every ``runner.*`` module a file imports."""
    return {name for name in absolute_imports(path) if name.startswith("runner.")}


def import_graph() -> dict[str, set[str]]:
    modules = {f"runner.{path.stem}": path for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    return {name: imported_modules(path) & modules.keys() for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (the first repeated at the end), or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        for target in sorted(graph.get(module, ())):
            cycle = visit(target, [*path, module])
            if cycle:
                return cycle
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_top_level_and_lazy_imports():
    graph = import_graph()
    assert "runner.schedules" in graph["runner.build"]  # at the top of build.py
    assert "runner.run" in graph["runner.__main__"]  # inside main(), so --cfg job imports no torch


def test_no_import_cycle_inside_the_package():
    assert find_cycle(import_graph()) is None


def declared_distributions() -> set[str]:
    """Every distribution pyproject.toml asks for, in dependencies or an extra other than dev, normalised."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = [deps for name, deps in project["optional-dependencies"].items() if name != "dev"]
    requirements = project["dependencies"] + [req for deps in extras for req in deps]
    return {normalised(re.match(r"[A-Za-z0-9_.-]+", req).group()) for req in requirements}


def normalised(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def test_every_third_party_package_the_runner_imports_is_declared():
    # A package that only arrives with another (torchmetrics on a machine that had it) breaks a fresh install.
    own = {"runner", "hydra_plugins", "__future__"}
    files = [*PACKAGE.glob("*.py"), *ROOT.glob("hydra_plugins/**/*.py")]
    imported = {name.partition(".")[0] for path in files for name in absolute_imports(path)}
    third_party = sorted(imported - own - set(sys.stdlib_module_names))
    providers, declared = packages_distributions(), declared_distributions()
    undeclared = [name for name in third_party if not {normalised(d) for d in providers.get(name, [name])} & declared]
    assert third_party, "the import scan found nothing"
    assert not undeclared, f"imported by runner/ but not declared in pyproject.toml: {undeclared}"
