"""The import boundaries of the design, read from the source with ast: training never imports
tracking, tracking never imports training, only the tracking package talks to MLflow, and the
package's modules import each other without a circle (and no module imports its own package's
__init__, which imports it)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
TRAINING = {"train", "monitor", "model", "run", "grid", "bench"}  # what trains, or drives training
MODULES = {p.relative_to(PACKAGE).with_suffix("").as_posix().removesuffix("/__init__").replace("/", ".") or "pipeline"
           for p in PACKAGE.rglob("*.py")}


def imports() -> dict[str, set[str]]:
    """module (e.g. 'tracking.logger', a package by its name) -> the names it imports, absolute,
    'pipeline.' dropped; `from . import x` names the submodule x, not the package."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = path.relative_to(PACKAGE).with_suffix("").as_posix()
        package = module.split("/")[:-1]  # what `from .x` is relative to (for __init__ too)
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = package[: len(package) - (node.level - 1)]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                    for alias in node.names:  # a submodule by its own name, anything else from its module
                        sub = f"{target}.{alias.name}".strip(".")
                        names.add(sub if sub in MODULES else target or "pipeline")
                else:
                    names |= {(node.module or "").removeprefix("pipeline.")}
        found[module.removesuffix("/__init__").replace("/", ".")] = {n.removeprefix("pipeline.") for n in names}
    return found


def edges() -> dict[str, set[str]]:
    """module -> the package's modules it imports (at any level of its code)."""
    return {module: {n for n in names if n in MODULES and n != module} for module, names in imports().items()}


def test_the_import_walk_sees_relative_imports():
    graph = imports()
    assert "train" in graph["run"] and "tracking" in graph["run"]
    assert any(n.startswith("mlflow") for n in graph["tracking.store"])
    assert "report.svg" in edges()["report.runpage"] and "report" not in edges()["report.runpage"]


def test_only_the_tracking_package_imports_mlflow():
    for module, names in imports().items():
        if not module.startswith("tracking"):
            assert not any(n.split(".")[0] == "mlflow" for n in names), module


def test_tracking_imports_no_training_code():
    for module, names in imports().items():
        if module.startswith("tracking"):
            assert not {n.split(".")[0] for n in names} & TRAINING, (module, names)


def test_training_imports_no_tracking_code():
    for module in ("train", "monitor", "model"):
        assert not any(n.split(".")[0] == "tracking" for n in imports()[module]), module


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_circles_finds_a_circle_and_only_circles():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_package_imports_have_no_circle():
    assert circles(edges()) == []


def test_no_module_imports_its_own_package():
    for module, imported in edges().items():
        parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        assert not imported & parents, (module, imported & parents)
