"""Print sci-scale's package-level import graph (from grimp, the graph library of import-linter).

Every import counts, those inside functions too. The output is a Mermaid flowchart, top layer
first; docs/architecture.md shows it. Usage: ``.venv/bin/python tools/import_graph.py``.
"""

from __future__ import annotations

import sys

import grimp


def package_edges(root: str = "sci_scale") -> set[tuple[str, str]]:
    """(importer, imported) between the sub-packages (and top-level modules) of ``root``."""
    graph = grimp.build_graph(root)

    def package(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else parts[0]

    edges = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            a, b = package(module), package(imported)
            if a != b and root not in (a, b) and a != "__main__":
                edges.add((a, b))
    return edges


def main() -> int:
    edges = package_edges()
    print("```mermaid")
    print("flowchart TD")
    for a, b in sorted(edges):
        print(f"    {a} --> {b}")
    print("```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
