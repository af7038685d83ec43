"""The package's shape: no import cycles at module level."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "revffn_fx"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The revffn_fx modules ``path`` imports when it is imported (imports inside functions
    and under ``if TYPE_CHECKING:`` run later or never, so they cannot form a cycle)."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)

    visit(ast.parse(path.read_text()).body)
    # importing a.b.c imports the packages a and a.b first; a module's own ancestor
    # packages are already being imported when it runs, so they are not edges
    closed = set()
    for target in found:
        parts = target.split(".")
        closed.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {t for t in closed if t in modules and t != name and t not in ancestors}


def import_graph() -> nx.DiGraph:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module(f) for f in files}
    graph = nx.DiGraph()
    for f in files:
        graph.add_node(_module(f))
        for target in _top_level_imports(f, modules):
            graph.add_edge(_module(f), target)
    return graph


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_cycle(tmp_path: Path) -> None:
    """The graph builder is not vacuous: the real package has edges, and a known pair of
    imports shows up as an edge."""
    graph = import_graph()
    assert graph.number_of_edges() > 20
    assert graph.has_edge("revffn_fx.checks.verification", "revffn_fx.runtime.stack")



def _all_imports(path: Path, modules: set[str]) -> set[str]:
    """Every revffn_fx module ``path`` imports, inside functions too (not under
    ``if TYPE_CHECKING:``, which never runs)."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
        for alias in node.names:
            full = f"{target}.{alias.name}"
            dst = full if full in modules else target
            if dst in modules and dst != name:
                found.add(dst)
    return found


def test_no_cycles_through_lazy_imports_in_the_compiler_and_runtime() -> None:
    """Counting imports inside functions: the runtime, the passes, the frontend and the
    couplings take part in no import cycle (the runtime's stack -> function -> stack knot
    and couple <-> couple_momentum were broken up; the RevModel / export knot remains)."""
    paths = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    for name, path in paths.items():
        graph.add_node(name)
        for dst in _all_imports(path, set(paths)):
            graph.add_edge(name, dst)
    knotted = {m for scc in nx.strongly_connected_components(graph) if len(scc) > 1
               for m in scc}
    layers = ("revffn_fx.runtime", "revffn_fx.passes", "revffn_fx.frontend",
              "revffn_fx.couplings")
    assert not {m for m in knotted if m.startswith(layers)}, sorted(knotted)


def test_couplings_import_without_torch() -> None:
    """The registry is read by the CLI before the heavy imports."""
    import subprocess
    import sys

    code = ("import sys, revffn_fx.couplings as c; c.get('bdia'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
