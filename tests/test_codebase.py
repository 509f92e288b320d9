"""The shape of the code: no import circles between nanoseek's modules (function-level imports
included), no import from a lower layer into a higher one (docs/ARCHITECTURE.md), no function
past ~80 lines, and the tree clean under ruff."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nanoseek"
MAX_FUNCTION_LINES = 80
# docs/ARCHITECTURE.md's layers, bottom to top: a module imports only from its own layer and below
LAYERS = [
    ["config", "tools", "device"],
    ["model"],
    ["data"],
    ["hf", "checkpoint", "nanoseek"],  # (the package's own nanoseek.load() is checkpoint's)
    ["infer"],
    ["eval"],
    ["train"],
    ["pipeline", "recipes"],
    ["export", "gguf"],
    ["serve"],
    ["bench"],
    ["cli", "__main__"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def import_graph(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> the nanoseek modules it imports, wherever the import statement stands."""
    graph: dict[str, set[str]] = {}
    for name, tree in trees.items():
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.split(".")[0] == "nanoseek"}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nanoseek":
                for alias in node.names:  # `from nanoseek.train import dist` imports the module dist
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in trees else node.module)
        graph[name] = {e for e in edges if e in trees and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = import_graph(modules())
    assert "nanoseek.train.trainer" in graph["nanoseek.cli"]  # the walk sees the imports
    assert cycles(graph) == []


def layer(module: str) -> int:
    """The layer of a module (its first name under nanoseek; the package itself is the top)."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "nanoseek"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if layer(b) > layer(a))


def test_the_layer_check_finds_an_upward_import():
    assert upward({"nanoseek.eval": {"nanoseek.train.trainer"}, "nanoseek.train.trainer": {"nanoseek.eval"}}) == [
        "nanoseek.eval -> nanoseek.train.trainer"]


def test_no_layer_imports_from_a_layer_above_it():
    trees = modules()
    assert all(layer(m) >= 0 for m in trees)  # every module has a layer (a new top-level name needs one)
    assert upward(import_graph(trees)) == []
    doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    for names in LAYERS[:-1]:  # the layers are the ones the architecture page names
        for name in (n for n in names if n != "nanoseek"):
            assert f"{name}/" in doc or f"{name}.py" in doc, name


def test_no_function_runs_past_80_lines():
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, tree in modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: `make setup` installs it with the dev extra")
    root = PACKAGE.parent
    r = subprocess.run([ruff, "check", "nanoseek", "tests"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
