"""The package's shape (issue 26): no import cycles, counting imports inside functions; no
module over 450 lines, no function over 60; no private name imported across modules."""

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



def _imported_names(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every ``from revffn_fx... import name`` in ``path``, relative or
    absolute, inside functions too (not under ``if TYPE_CHECKING:``, which never runs);
    ``import revffn_fx.x`` gives (``revffn_fx.x``, "")."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    found: list[tuple[str, str]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "revffn_fx":
                found += [(target, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.split(".")[0] == "revffn_fx"]
    return found


def _all_imports(path: Path, modules: set[str]) -> set[str]:
    """Every revffn_fx module ``path`` imports, inside functions too."""
    name = _module(path)
    found: set[str] = set()
    for target, alias in _imported_names(path):
        full = f"{target}.{alias}"
        dst = full if full in modules else target
        if dst in modules and dst != name:
            found.add(dst)
    return found


def test_no_cycles_through_lazy_imports() -> None:
    """Counting imports inside functions, relative and absolute: no import cycle anywhere
    in the package (lazy imports are for optional or heavy dependencies, never a cycle).
    A package's ``__init__`` re-exporting its modules is not an edge back into them."""
    paths = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    for name, path in paths.items():
        graph.add_node(name)
        if path.name == "__init__.py":
            continue  # re-exports: importing a.b runs a's __init__ first anyway
        for dst in _all_imports(path, set(paths)):
            if paths[dst].name != "__init__.py":
                graph.add_edge(name, dst)
    knotted = [sorted(scc) for scc in nx.strongly_connected_components(graph) if len(scc) > 1]
    assert not knotted, knotted


def test_the_checker_counts_lazy_absolute_imports() -> None:
    """A function-level absolute import is an edge (the CLI imports its heavy part so)."""
    paths = {_module(p): p for p in PACKAGE.rglob("*.py")}
    source = (PACKAGE / "cli.py").read_text()
    assert "    from revffn_fx.export import transform_dir" in source  # inside a function
    assert "revffn_fx.export" in _all_imports(PACKAGE / "cli.py", set(paths))


#: the sizes a newcomer can hold in their head (issue 26)
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 60


def test_no_module_over_450_lines() -> None:
    big = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, big


def test_no_function_over_60_lines() -> None:
    long = {}
    for p in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(PACKAGE)}:{node.lineno} {node.name}"] = n
    assert not long, long


def test_no_private_name_imported_across_modules() -> None:
    paths = {_module(p): p for p in PACKAGE.rglob("*.py")}
    private = [f"{name} imports {target}.{alias}" for name, path in paths.items()
               for target, alias in _imported_names(path)
               if alias.startswith("_") and not alias.startswith("__")
               and f"{target}.{alias}" not in paths]
    assert not private, private


def test_couplings_import_without_torch() -> None:
    """The registry is read by the CLI before the heavy imports."""
    import subprocess
    import sys

    code = ("import sys, revffn_fx.couplings as c; c.get('bdia'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
