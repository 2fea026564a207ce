"""The shape of the package, as issue 15 asks it: a model with one forward path that knows nothing
of quantization or serving, short functions, and no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "llamita"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def test_model_has_one_forward_path_and_no_quantization_or_serving():
    tree = ast.parse((PACKAGE / "model.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {m for m in imported if m.startswith("llamita")} == {"llamita.config"}
    words = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not [w for w in words if any(k in w.lower() for k in ("quant", "serve", "compil", "engine"))]
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward"):
            # A branch on the module's own state would be a second path (e.g. "if self.qkv_proj is not None").
            tests = [ast.unparse(n.test) for n in ast.walk(fn) if isinstance(n, (ast.If, ast.IfExp))]
            assert not [t for t in tests if "self." in t], (cls.name, tests)


def test_no_function_over_60_lines():
    long = [f"{module_name(p)}.{n.name}: {n.end_lineno - n.lineno + 1}" for p in PACKAGE.rglob("*.py")
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 60]
    assert not long


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports, anywhere in it (functions too), but not under
    ``if TYPE_CHECKING``; importing a module imports its packages' __init__ too."""
    tree = ast.parse(path.read_text())
    typing_only = [b for b in ast.walk(tree) if isinstance(b, ast.If) and "TYPE_CHECKING" in ast.unparse(b.test)]
    skip = {id(n) for block in typing_only for n in ast.walk(block)}
    found = set()
    for n in ast.walk(tree):
        if id(n) in skip:
            continue
        names = [a.name for a in n.names] if isinstance(n, ast.Import) else \
            [n.module] + [f"{n.module}.{a.name}" for a in n.names] if isinstance(n, ast.ImportFrom) and n.module else []
        for name in names:
            parts = name.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules
    return found - {module_name(path)}


def test_no_import_cycle():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: imports(p, set(paths)) for m, p in paths.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, " -> ".join(path + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert len(graph) > 20 and graph["llamita.llm"] >= {"llamita.generate", "llamita.cache"}
