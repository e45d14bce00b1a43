"""The import graph of `dreambooth_jax/` and `tools/` runs down the layers and has no cycles.

Read from the source with `ast` (nothing is imported): every `import` and `from ... import`, at module
level or in a function. `from X import Y` is an import of the module `X.Y` when that is one of ours, else
of `X`; the package root (`import dreambooth_jax`, `from dreambooth_jax import __version__`) counts as
nothing. Tools import each other as plain modules (`tools/` is on `sys.path` when one runs as a script).
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "dreambooth_jax"

# Low to high; a module's layer is that of its longest matching prefix. A module may import its own layer
# (one way: no cycles) and those below it. Any other `dreambooth_jax.<name>` (the CLIs, the package root) is
# layer 9, the tools 10.
LAYERS = [
    ["errors", "fileio", "cli", "images", "storage", "parallel", "kernels", "configs"],
    ["models"],
    ["weights", "diffusion", "lora"],
    ["families"],
    ["pipeline", "datasets"],
    ["training"],
    ["evaluation"],
    ["paper"],  # the paper's protocol: trains, samples and scores
    ["testing"],
]
CLI_LAYER, TOOLS_LAYER = len(LAYERS), len(LAYERS) + 1
LAYER_OF = {f"{PACKAGE}.{name}": n for n, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, str]:
    """{module name: file} of `dreambooth_jax/` (a package by its `__init__.py`) and `tools/` (as
    `tools.<name>`)."""
    out = {}
    for top in (PACKAGE, "tools"):
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            parts = os.path.relpath(folder, ROOT).split(os.sep)
            for f in sorted(files):
                if f.endswith(".py"):
                    name = parts if f == "__init__.py" else [*parts, f[:-3]]
                    out[".".join(name)] = os.path.join(folder, f)
    return out


def _imports(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """The modules of ours that `module` (at `path`) imports."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]

    def ours(name: str) -> str | None:
        if module.startswith("tools.") and f"tools.{name}" in modules:  # a tool importing another
            return f"tools.{name}"
        while name and name not in modules:  # `import a.b.c` of a non-module c: a.b
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {ours(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up `level - 1`
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else ours(base))
    return {m for m in found if m and m != PACKAGE and m != module}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, path, modules) for m, path in modules.items()}


def layer(module: str) -> int:
    if module.startswith("tools."):
        return TOOLS_LAYER
    prefixes = [p for p in LAYER_OF if module == p or module.startswith(p + ".")]
    return LAYER_OF[max(prefixes, key=len)] if prefixes else CLI_LAYER


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) where the imported module is in a higher layer."""
    return sorted((a, b) for a, bs in graph.items() for b in bs if layer(b) > layer(a))


def _describe_cycle(graph, component) -> str:
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in component]
    return f"{{{', '.join(component)}}}: {'; '.join(edges)}"


def test_graph_is_read():
    """The graph sees what it should (else the two tests below would pass on an empty graph), and a cycle and
    an upward import are found where there is one."""
    graph = import_graph()
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert upward_imports({"dreambooth_jax.models.unet": {"dreambooth_jax.training.step"}}) == [
        ("dreambooth_jax.models.unet", "dreambooth_jax.training.step")]
    assert "dreambooth_jax.kernels.choose" in graph["dreambooth_jax.training.config"]  # from X import module
    assert "dreambooth_jax.errors" in graph["dreambooth_jax.training.config"]  # from X import name
    assert "dreambooth_jax.datasets.dreambooth" in graph["dreambooth_jax.training.config"]  # in a function
    assert "tools.bench_train_common" in graph["tools.bench_train"]  # tools as plain modules
    assert PACKAGE not in {m for ms in graph.values() for m in ms}
    assert layer("dreambooth_jax.train") == layer(PACKAGE) == CLI_LAYER
    assert layer("dreambooth_jax.training.config") == 5 and layer("tools.bench_train") == TOOLS_LAYER


def test_no_import_cycles():
    graph = import_graph()
    found = [_describe_cycle(graph, c) for c in cycles(graph)]
    assert not found, "modules that import each other (directly or through others):\n  " + "\n  ".join(found)


def test_imports_run_down_the_layers():
    graph = import_graph()
    found = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})" for a, b in upward_imports(graph)]
    assert not found, "imports from a lower layer to a higher one:\n  " + "\n  ".join(found)


if __name__ == "__main__":  # the graph's problems today: python tests/test_layers.py
    g = import_graph()
    for c in cycles(g):
        print("cycle:", _describe_cycle(g, c))
    for a, b in upward_imports(g):
        print(f"upward: {a} ({layer(a)}) -> {b} ({layer(b)})")
