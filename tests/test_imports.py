"""The house's import rules, read from the source: no import cycle inside minitrain/, and the torch-free
stages (data/, inspect/, plot/, and the run-directory and config modules) never import train/ or the CLI.

Every `import` counts, at module level or inside a function (a lazy import is still a dependency),
except those under `if TYPE_CHECKING:`. A module's parent packages are not counted as its imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minitrain"
TORCH_FREE = ("minitrain.data", "minitrain.inspect", "minitrain.plot", "minitrain.rundir", "minitrain.config")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the minitrain modules it imports."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = _imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {t for t in targets if t in files and t != name and t not in parents}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_lazy_imports_are_read():
    tree = ast.parse(
        "from .x import y\ndef f():\n    import minitrain.train.z\nif TYPE_CHECKING:\n    import q\n"
    )
    found = _imports(tree, "minitrain.data.chat", is_package=False)
    assert {"minitrain.data.x", "minitrain.data.x.y", "minitrain.train.z"} <= found and "q" not in found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_torch_free_stages_do_not_import_train_or_the_cli():
    bad = {
        (module, target)
        for module, targets in import_graph().items()
        if module.startswith(TORCH_FREE)
        for target in targets
        if target.startswith(("minitrain.train", "minitrain.cli"))
    }
    assert bad == set()
