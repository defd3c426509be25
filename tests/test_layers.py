"""The package's layers: no module imports from a layer above its own, imports inside functions included, and no
module reaches itself again through its imports (no cycles). ARCHITECTURE.md draws the same map."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "granite_docling"

# The layers, ground first; a module may import its own layer and those below. Every module is named here (a
# new one fails test_every_module_is_placed until it is); ARCHITECTURE.md draws the same map.
LAYERS = {
    "config and checkpoint": [
        "",  # granite_docling itself
        "config",
        "legacy_config",
        "evaluation.config",
        "checkpoint",
        "checkpoint_manifest",
        "atomic_folders",
        "precision",
        "user_error",
    ],
    "model and data": [
        "model",
        "data",
        "data.sample",
        "data.answers",
        "data.images",
        "data.image_tiles",
        "data.lengths",
        "data.encoding",
        "data.formats",
        "data.formats.base",
        "data.formats.arrow",
        "data.formats.folder",
        "data.formats.hub",
        "data.formats.docling_eval",
        "data.sources",
        "data.index",
        "data.split",
        "data.sampler",
        "data.training_data",
        "data.indexed",
        "data.streaming",
        "data.loading",
    ],
    "training and evaluation parts": [
        "loss",
        "flops",
        "tracking",
        "collectives",
        "optimization",
        "optimizers",
        "progress",
        "training_run",
        "run_control",
        "evaluation",
        "evaluation.doctags",
        "evaluation.text_metrics",
        "evaluation.teds",
        "evaluation.layout",
        "evaluation.loops",
        "evaluation.metrics",
        "evaluation.records",
        "evaluation.generate",
        "evaluation.server",
        "evaluation.loss_curve",
        "evaluation.html_report",
        "evaluation.report",
        "evaluation.export",
        "evaluation.docling_eval_export",
        "evaluation.docling_pipeline",
        "evaluation.runner",
    ],
    "runs (what the entry points call)": [
        "train_loop",
        "launch",
        "preflight",
        "slurm",
        "errors",
        "cli",
        "tools",
        "tools.sample_data",
        "tools.synth_pages",
        "tools.synth_text",
        "tools.prepare",
        "tools.pages",
        "tools.validate",
        "tools.predict",
        "tools.export",
        "tools.export.untied",
        "tools.export.mlx",
        "tools.export.gguf",
    ],
}
PLACED = {
    ".".join(["granite_docling", name]).rstrip("."): index
    for index, names in enumerate(LAYERS.values())
    for name in names
}


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def layer_of(module: str) -> int:
    """The layer index of a module, by its name in LAYERS."""
    if module not in PLACED:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to ARCHITECTURE.md)")
    return PLACED[module]


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Every module of the package that ``module`` imports, anywhere in the file (functions included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {name for name in found if name in known and name != module}


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    return {module: imports_of(module, path, set(names)) for module, path in names.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}  # visiting order
    low: dict[str, int] = {}  # the lowest index reachable
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return groups


def test_every_module_is_placed_by_name_and_every_name_is_a_module():
    modules = set(module_names())
    assert sorted(modules - PLACED.keys()) == [], "add these to LAYERS (and to ARCHITECTURE.md)"
    assert sorted(PLACED.keys() - modules) == [], "LAYERS names modules that are gone"
    assert sum(map(len, LAYERS.values())) == len(PLACED)  # no module named twice


def test_no_module_imports_from_a_layer_above_its_own():
    graph = import_graph()
    upward = [f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
              for module, targets in sorted(graph.items()) for target in sorted(targets)
              if layer_of(target) > layer_of(module)]  # fmt: skip
    assert upward == []


def test_no_import_cycles_between_modules():
    assert cycles(import_graph()) == []


def test_the_checks_catch_an_upward_import_and_a_cycle():
    graph = {"granite_docling.config": {"granite_docling.data.sources"}, "granite_docling.data.sources": set()}
    assert layer_of("granite_docling.data.sources") > layer_of("granite_docling.config")  # what the first test flags
    looped = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(looped) == [["a", "b", "c"]] and cycles(graph) == []
