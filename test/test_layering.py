"""Package layering of ``spark3r/``, read from the source with ``ast`` (every import counts,
including the ones inside functions): backbones know nothing of what uses them, attention ops
nothing of benchmarks or the mapper, no two units of ``spark3r`` import each other (directly or
round a longer loop), and the core never touches ROS.

A unit is a subpackage (``spark3r/models``) or a top-level module (``spark3r/geometry.py``);
new modules and packages are picked up without touching this test.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "spark3r"

FORBIDDEN = {
    "models": {"accel", "mapping", "bench", "offline", "eval"},
    "accel": {"bench", "mapping", "offline", "eval"},
}
ROS_MODULES = ("rclpy", "spark3r_ros")


def _module_parts(path: Path) -> tuple[list[str], bool]:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return parts[:-1], True
    return parts, False


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """Absolute names of everything ``path`` imports, with line numbers."""
    parts, is_package = _module_parts(path)
    package = parts if is_package else parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.module, node.lineno))
                continue
            base = package[: len(package) - (node.level - 1)]
            if node.module:
                found.append((".".join(base + node.module.split(".")), node.lineno))
            else:  # from . import x: x may be a module
                found += [(".".join(base + [alias.name]), node.lineno) for alias in node.names]
    return found


def unit_of(module: str) -> str | None:
    """``spark3r.models.vggt`` -> ``models``; None outside ``spark3r`` or for the package root."""
    parts = module.split(".")
    return parts[1] if parts[0] == "spark3r" and len(parts) > 1 else None


def source_files() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def unit_edges() -> dict[str, dict[str, list[str]]]:
    """unit -> imported unit -> ["file:line", ...]."""
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in source_files():
        parts, _ = _module_parts(path)
        source = parts[1] if len(parts) > 1 else None
        if source is None:
            continue
        for module, line in imported_modules(path):
            target = unit_of(module)
            if target is not None and target != source:
                edges[source][target].append(f"{path.relative_to(ROOT.parent)}:{line}")
    return edges


def test_the_tree_is_read():
    edges = unit_edges()
    # Sanity: the reader sees the known dependencies, so an empty result cannot pass silently.
    assert "models" in edges["accel"] and "accel" in edges["bench"] and "models" in edges["mapping"]
    assert len(source_files()) > 40


@pytest.mark.parametrize("unit", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_upper_ones(unit):
    edges = unit_edges()
    bad = {target: where for target, where in edges[unit].items() if target in FORBIDDEN[unit]}
    assert not bad, f"spark3r.{unit} must not import {sorted(bad)}: {bad}"


def test_no_import_cycle_between_units():
    edges = {u: set(t) for u, t in unit_edges().items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(unit: str) -> list[str] | None:
        state[unit] = 1
        path.append(unit)
        for nxt in sorted(edges.get(unit, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[unit] = 2
        return None

    for unit in sorted(edges):
        if unit not in state:
            cycle = visit(unit)
            assert cycle is None, "import cycle between spark3r units: " + " -> ".join(cycle)


def test_the_core_never_imports_ros():
    bad = [f"{path.relative_to(ROOT.parent)}:{line} imports {module}"
           for path in source_files() for module, line in imported_modules(path)
           if module.split(".")[0] in ROS_MODULES]
    assert not bad, "spark3r/ must stay ROS-free:\n" + "\n".join(bad)


def test_relative_imports_resolve_to_absolute_names():
    assert unit_of("spark3r.models.layers.layout") == "models" and unit_of("spark3r") is None
    modules = {m for m, _ in imported_modules(ROOT / "models" / "layers" / "attention.py")}
    assert "spark3r.models.layers.layout" in modules  # from .layout import ...
    modules = {m for m, _ in imported_modules(ROOT / "models" / "__init__.py")}
    assert "spark3r.models.registry" in modules  # from .registry import ... in a package
