"""Facts about hetegen's internal import graph: arrows, cycles, depth, module sizes.

Usage: python scripts/import_graph.py [PACKAGE] [--json]
Counts every `import` of one hetegen module by another (top-level and inside functions, as
grimp sees them), the cycles (strongly connected components of more than one module), the
longest import chain, how many imports sit inside function bodies, and the largest modules.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import grimp


def _late_imports(package_dir: Path) -> dict[str, int]:
    """Imports of the package written inside a function or method body, per top folder."""
    count: dict[str, int] = {}
    for path in package_dir.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    n = 0
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith(
                        package_dir.name
                    ):
                        n = 1
                    elif isinstance(inner, ast.Import):
                        n = sum(a.name.startswith(package_dir.name) for a in inner.names)
                    if n:
                        where = path.relative_to(package_dir).parts[0].removesuffix(".py")
                        count[where] = count.get(where, 0) + n
    return count


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
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
        for w in edges.get(v, ()):
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

    sys.setrecursionlimit(10_000)
    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def _depth(edges: dict[str, set[str]]) -> int:
    """Modules on the longest import chain (acyclic graphs; cycles are cut)."""
    memo: dict[str, int] = {}

    def longest(v: str, seen: frozenset[str]) -> int:
        if v in memo:
            return memo[v]
        best = 1 + max((longest(w, seen | {v}) for w in edges.get(v, ()) if w not in seen), default=0)
        memo[v] = best
        return best

    return max((longest(v, frozenset()) for v in edges), default=0)


def main() -> None:
    package = next((a for a in sys.argv[1:] if not a.startswith("--")), "hetegen_cli")
    graph = grimp.build_graph(package)
    modules = sorted(m for m in graph.modules if m.startswith(package))
    edges = {
        m: {i for i in graph.find_modules_directly_imported_by(m) if i.startswith(package)} for m in modules
    }
    arrows = sum(len(v) for v in edges.values())

    def top(m: str) -> str:
        parts = m.split(".")
        return parts[1] if len(parts) > 2 else "(root)"

    between = sorted({(top(a), top(b)) for a, bs in edges.items() for b in bs if top(a) != top(b)})
    root = Path(__import__(package).__file__).parent
    sizes = sorted(
        (
            (sum(1 for _ in p.open(encoding="utf-8")), str(p.relative_to(root.parent)))
            for p in root.rglob("*.py")
        ),
        reverse=True,
    )
    facts = {
        "package": package,
        "modules": len(modules),
        "import_arrows": arrows,
        "package_arrows": [f"{a} -> {b}" for a, b in between],
        "cycles": _cycles(edges),
        "longest_chain_modules": _depth(edges),
        "imports_inside_functions": _late_imports(root),
        "largest_modules": [{"path": p, "lines": n} for n, p in sizes[:5]],
    }
    if "--json" in sys.argv:
        print(json.dumps(facts, indent=2))
        return
    print(
        f"{package}: {facts['modules']} modules, {arrows} internal import arrows, "
        f"{len(facts['cycles'])} cycles, longest chain {facts['longest_chain_modules']} modules, "
        f"internal imports inside functions: {facts['imports_inside_functions'] or 'none'}"
    )
    if any(top(m) != "(root)" for m in modules):
        print(f"  between subpackages ({len(between)}): " + ", ".join(facts["package_arrows"]))
    for cycle in facts["cycles"]:
        print("  cycle:", " <-> ".join(cycle))
    for m in facts["largest_modules"]:
        print(f"  {m['lines']:5d} lines  {m['path']}")


if __name__ == "__main__":
    main()
