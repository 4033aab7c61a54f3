"""The package's shape: layers import only downward, and no module imports itself in a circle.

    cli, serve, demo, inspect_adapter, export  front doors
    train                                      tasks, batching, the trainer loop
    methods                                    the paper's baselines beside LoRA
    lora                                       the core: math, layers, inject, merge, I/O
    _fs, adapter_dir, models, quantize         leaves: files, adapter dir info, model loading, quantising

Every import counts, at module level or inside a function (a lazy import is still a
dependency), found by walking the AST of src/lorakit; only `if TYPE_CHECKING:` imports
(annotations) are exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"
LAYERS = [
    {"_fs", "adapter_dir", "models", "quantize"},
    {"lora"},
    {"methods"},
    {"train"},
    {"serve", "cli", "demo", "inspect_adapter", "export", "__main__", "__init__", "data"},
]
RANK = {top: i for i, layer in enumerate(LAYERS) for top in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py", modules)


def imports_in(source: str, me: str, is_package: bool, modules: set[str]) -> set[str]:
    """The lorakit modules that `source` (module `me`) imports; `from pkg import name` of a
    submodule counts as that submodule."""
    package = me if is_package else me.rpartition(".")[0]
    tree = ast.parse(source)
    # `if TYPE_CHECKING:` imports are for annotations only: no dependency at run time.
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
        for n in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lorakit")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("lorakit"):
                continue
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules}
            found |= subs or {target}
            if subs and len(subs) < len(node.names):
                found.add(target)
    return {m for m in found if m != me}


def graph() -> dict[str, set[str]]:
    paths = sorted(SRC.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) & modules for p in paths}


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_top_level_module_has_a_layer():
    assert {top(m) for m in graph()} <= set(RANK), "add new top-level modules to LAYERS"


def test_layers_import_only_downward():
    upward = [
        f"{m} -> {d}"
        for m, deps in graph().items()
        for d in deps
        if RANK[top(d)] > RANK[top(m)] and top(m) != "__init__"
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    g = graph()

    # A package's __init__ re-exports its submodules; an edge into a package is an edge to its
    # __init__, and a submodule importing its own package's names is not a cycle of code.
    def deps(m):
        return {d for d in g[m] if not m.startswith(d + ".")}

    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in deps(m):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in g:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    "line", ["from ...train.api import train", "import lorakit.serve.engine", "from ... import methods"]
)
def test_the_walker_sees_an_upward_import_even_inside_a_function(line):
    """The check is not vacuous: a core module importing upward, lazily, is reported."""
    modules = set(graph())
    found = imports_in(f"def f():\n    {line}\n", "lorakit.lora.functional", False, modules)
    assert found and all(RANK[top(d)] > RANK["lora"] for d in found)
