"""The shape of the code: import layers, no import cycles, no unexplained long modules.

Each check runs on sci_scale and, to show it can fail, on a small package written into
``tmp_path`` that breaks it on purpose.
"""

from __future__ import annotations

import ast
import itertools
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 400
# A module longer than MAX_LINES says why in a line of its docstring that starts with this.
LONG_REASON = "Longer than 400 lines because"


def lint_imports(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """import-linter's own command on ``config``, its report in ``stdout``."""
    code = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    env = {**os.environ, "PYTHONPATH": str(cwd), "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-c", code, str(config), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def import_cycles(package: str) -> list[list[str]]:
    """One cycle (``a, b, ..., a``) per group of modules that import each other, directly or
    through others; imports inside functions count too."""
    graph = grimp.build_graph(package, cache_dir=None)
    imports = {
        m: sorted(i for i in graph.find_modules_directly_imported_by(m) if i in graph.modules)
        for m in sorted(graph.modules)
    }
    return [
        _cycle_through(imports, min(group), set(group))
        for group in _strongly_connected(imports)
        if len(group) > 1
    ]


def _strongly_connected(edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (a deep import chain must not hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        work.append((node, iter(edges[node])))

    for root in edges:
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = []
        visit(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    visit(child)
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                groups.append(sorted(group))
    return groups


def _cycle_through(edges: dict[str, list[str]], start: str, group: set[str]) -> list[str]:
    """The shortest import path from ``start`` back to itself, found breadth first."""
    previous: dict[str, str] = {start: start}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in edges[node]:
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child in group and child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is in an import cycle, but no path leads back to it")


def _describe(package: str, cycle: list[str]) -> str:
    """A cycle with the line of each import in it, so the one to remove is easy to find."""
    graph = grimp.build_graph(package, cache_dir=None)
    lines = []
    for importer, imported in itertools.pairwise(cycle):
        details = graph.get_import_details(importer=importer, imported=imported)
        where = ", ".join(f"line {d['line_number']}: {d['line_contents']}" for d in details)
        lines.append(f"  {importer} -> {imported} ({where})")
    return "\n".join(lines)


def long_modules(root: Path) -> list[str]:
    """Modules over MAX_LINES lines whose docstring gives no reason for their length."""
    out = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        if lines <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not any(line.strip().startswith(LONG_REASON) for line in doc.splitlines()):
            out.append(f"{path.relative_to(root.parent)}: {lines} lines")
    return out


def test_imports_keep_the_contracts_in_pyproject() -> None:
    result = lint_imports(REPO / "pyproject.toml", REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_two_modules_import_each_other() -> None:
    cycles = import_cycles("sci_scale")
    assert not cycles, "import cycles:\n" + "\n".join(_describe("sci_scale", c) for c in cycles)


def test_long_modules_say_why() -> None:
    long = long_modules(REPO / "sci_scale")
    assert not long, (
        f"over {MAX_LINES} lines, and no docstring line starting {LONG_REASON!r}: split them "
        "or give the reason:\n" + "\n".join(long)
    )


# A package with layers high > (mid_a | mid_b) > low, for checks that must fail when broken.
TOY = "archtoy"
TOY_CONTRACTS = f"""
[tool.importlinter]
root_packages = ["{TOY}"]

[[tool.importlinter.contracts]]
id = "layers"
name = "toy layers"
type = "layers"
containers = ["{TOY}"]
layers = ["high", "mid_a | mid_b", "low"]
exhaustive = true
"""


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    package = tmp_path / TOY
    package.mkdir()
    modules = {
        "__init__": "",
        "low": "VALUE = 1\n",
        "mid_a": f"from {TOY} import low\n",
        "mid_b": "",
        "high": f"from {TOY} import mid_a, mid_b\n",
    }
    for name, text in modules.items():
        (package / f"{name}.py").write_text(text)
    (tmp_path / "pyproject.toml").write_text(TOY_CONTRACTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return package


def _break_layers(package: Path) -> None:
    """A lazy upward import: low -> high, which also closes the cycle high -> mid_a -> low."""
    (package / "low.py").write_text(
        textwrap.dedent(
            f"""\
            VALUE = 1


            def later():
                from {TOY} import high

                return high
            """
        )
    )


def test_the_contract_check_fails_on_an_upward_import(toy: Path) -> None:
    kept = lint_imports(toy.parent / "pyproject.toml", toy.parent)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    _break_layers(toy)
    broken = lint_imports(toy.parent / "pyproject.toml", toy.parent)
    assert broken.returncode != 0
    assert f"{TOY}.low -> {TOY}.high" in broken.stdout, broken.stdout


def test_the_cycle_check_finds_a_cycle_through_a_lazy_import(toy: Path) -> None:
    assert import_cycles(TOY) == []
    _break_layers(toy)
    cycles = import_cycles(TOY)
    assert cycles == [[f"{TOY}.high", f"{TOY}.mid_a", f"{TOY}.low", f"{TOY}.high"]]
    assert "line 5: from archtoy import high" in _describe(TOY, cycles[0])


def test_the_length_check_flags_a_long_module_without_a_reason(toy: Path) -> None:
    body = "\n".join(f"X{i} = {i}" for i in range(MAX_LINES + 1)) + "\n"
    (toy / "big.py").write_text(f'"""A big module."""\n{body}')
    assert long_modules(toy) == [f"{TOY}/big.py: {MAX_LINES + 2} lines"]
    (toy / "big.py").write_text(f'"""A big module.\n\n{LONG_REASON} it is a table.\n"""\n{body}')
    assert long_modules(toy) == []


def test_the_documented_import_graph_is_the_real_one() -> None:
    """docs/architecture.md shows the graph ``tools/import_graph.py`` draws; it must not drift."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import import_graph
    finally:
        sys.path.remove(str(REPO / "tools"))
    drawn = {f"{a} --> {b}" for a, b in import_graph.package_edges()}
    text = (REPO / "docs" / "architecture.md").read_text()
    block = text.split("```mermaid\n", 1)[1].split("```", 1)[0]
    documented = {line.strip() for line in block.splitlines() if "-->" in line}
    assert documented == drawn, (
        f"run tools/import_graph.py and update docs/architecture.md: missing "
        f"{sorted(drawn - documented)}, stale {sorted(documented - drawn)}"
    )
