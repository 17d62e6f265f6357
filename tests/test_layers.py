"""The architecture's rules, checked on the source: layers point one way, no import cycles,
short functions, short positional argument lists.

Layers: ``srmri`` (base) <- ``shards`` <- ``trainer`` (engine) <- ``trainer.experiment`` <-
``tune``, ``launch``. Imports inside functions and under ``TYPE_CHECKING`` count too: a lazy import
is still a dependency. ``launch`` knows the programs it submits by name and imports neither the
training loop nor the data plane.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("srmri", "shards", "trainer", "tune", "launch")
# Layer of each package (or subpackage); a module may import only its own layer or lower ones.
LAYER = {"srmri": 0, "shards": 1, "trainer": 2, "trainer.experiment": 3, "tune": 4, "launch": 4}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> Iterator[tuple[str, Path, ast.Module]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield _module_name(path), path, ast.parse(path.read_text(), str(path))


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(module: str, path: Path, tree: ast.Module) -> set[str]:
    """Every module of ours that ``module`` imports, wherever the import statement stands."""
    found: set[str] = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if _is_module(sub) else target)
    found.discard(module)
    return found


def _layer(module: str) -> tuple[str, int]:
    home = "trainer.experiment" if module.startswith("trainer.experiment") else module.split(".")[0]
    return home, LAYER[home]


GRAPH = {module: _imports(module, path, tree) for module, path, tree in _sources()}


def test_every_import_points_down_or_sideways_within_a_layer() -> None:
    wrong = []
    for module, targets in GRAPH.items():
        home, level = _layer(module)
        for target in targets:
            other, other_level = _layer(target)
            if other_level > level or (other_level == level and other != home):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that point up (or across) the layers:\n" + "\n".join(sorted(wrong))


def test_launch_imports_neither_the_loop_nor_the_data_plane() -> None:
    wrong = [
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        if m.startswith("launch")
        for t in targets
        if t.startswith(("shards", "trainer.loop"))
    ]
    assert not wrong, wrong


def test_no_two_modules_import_each_other() -> None:
    # Any cycle, not only pairs: a depth-first search over the import graph.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*trail[trail.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("limit", [80])
def test_no_function_body_is_longer_than_a_screen(limit: int) -> None:
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
        for _, path, tree in _sources()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > limit
    ]
    assert not long, long


def test_no_call_passes_more_than_six_positional_arguments() -> None:
    many = [
        f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node.func)}"
        for _, path, tree in _sources()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and sum(not isinstance(a, ast.Starred) for a in node.args) > 6
    ]
    assert not many, many


def test_formatter_is_not_switched_off_around_argument_lists() -> None:
    marks = [
        f"{path.relative_to(ROOT)}:{i}"
        for _, path, _ in _sources()
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "# fmt: skip" in line or "# fmt: off" in line
    ]
    assert len(marks) <= 3, marks
