"""The import boundaries of the design, read from the source with ast: training never imports
tracking, tracking never imports training, and only the tracking package talks to MLflow."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
TRAINING = {"train", "monitor", "model", "run", "grid", "bench"}  # what trains, or drives training


def imports() -> dict[str, set[str]]:
    """module path (e.g. 'tracking/logger') -> the names it imports, absolute, 'pipeline.' dropped."""
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
                    target = ".".join(["pipeline", *base, *([node.module] if node.module else [])])
                    names |= {target} | {f"{target}.{a.name}" for a in node.names}
                else:
                    names |= {node.module or ""}
        found[module] = {n.removeprefix("pipeline.") for n in names}
    return found


def test_the_import_walk_sees_relative_imports():
    graph = imports()
    assert "train" in graph["run"] and "tracking" in graph["run"]
    assert any(n.startswith("mlflow") for n in graph["tracking/store"])


def test_only_the_tracking_package_imports_mlflow():
    for module, names in imports().items():
        if not module.startswith("tracking/"):
            assert not any(n.split(".")[0] == "mlflow" for n in names), module


def test_tracking_imports_no_training_code():
    for module, names in imports().items():
        if module.startswith("tracking/"):
            assert not {n.split(".")[0] for n in names} & TRAINING, (module, names)


def test_training_imports_no_tracking_code():
    for module in ("train", "monitor", "model"):
        assert not any(n.split(".")[0] == "tracking" for n in imports()[module]), module
