"""The shape of the house: no import circles, no import that goes up a layer, no module over 600 lines.

Layers, lowest first (a module may import its own layer and the ones below):
    base     config, paths, tokenizer, corpora, data, distributed
    ops      sparkformer.ops.*                       (kernels and their references)
    model    model, flops
    engines  decode.*, train, train_config, checkpoint, hf, pretrained
    bricks   sparkformer.bricks.*
    app      loading, generate, evaluate, bench.*, demo, cli
Every import counts, the lazy ones inside functions too: a lazy import is still a dependency.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "sparkformer"
LAYERS = [
    ("base", ["sparkformer", "sparkformer.config", "sparkformer.paths", "sparkformer.tokenizer",
              "sparkformer.corpora", "sparkformer.data", "sparkformer.distributed"]),
    ("ops", ["sparkformer.ops"]),
    ("model", ["sparkformer.model", "sparkformer.flops", "sparkformer.sparsity"]),
    ("engines", ["sparkformer.decode", "sparkformer.train", "sparkformer.train_config", "sparkformer.checkpoint",
                 "sparkformer.hf", "sparkformer.pretrained"]),
    ("bricks", ["sparkformer.bricks"]),
    ("app", ["sparkformer.loading", "sparkformer.sparsify", "sparkformer.generate", "sparkformer.evaluate", "sparkformer.bench",
             "sparkformer.demo", "sparkformer.cli"]),
]
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


def _resolve(name: str, mods: dict) -> str:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> dict[str, set[str]]:
    """module -> the sparkformer modules it imports (at any depth of its code)."""
    mods = _modules()
    graph = {}
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps |= {_resolve(a.name, mods) for a in node.names if a.name.startswith("sparkformer")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg
                    for _ in range(node.level - 1):
                        up = up.rpartition(".")[0]
                    base = up + ("." + base if base else "")
                if base.startswith("sparkformer"):
                    for a in node.names:
                        full = f"{base}.{a.name}"
                        deps.add(_resolve(full if full in mods else base, mods))
        deps.discard(name)
        deps.discard("")
        graph[name] = deps
    return graph


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return rank


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, deps in sorted(graph.items()):
        for d in sorted(deps):
            if layer_of(d) > layer_of(m):
                bad.append(f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})")
    return bad


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_no_import_goes_up_a_layer():
    assert upward_imports(import_graph()) == []


def test_no_module_over_the_line_limit():
    long = {n: len(f.read_text().splitlines()) for n, f in _modules().items()}
    assert {n: k for n, k in long.items() if k > MAX_LINES} == {}


def test_the_checks_can_fail():
    """The checkers find a planted circle and a planted upward import."""
    g = {"sparkformer.ops.a": {"sparkformer.model"}, "sparkformer.model": {"sparkformer.ops.a"}}
    assert circles(g) == [["sparkformer.model", "sparkformer.ops.a"]]
    assert upward_imports(g) == ["sparkformer.ops.a (ops) imports sparkformer.model (model)"]
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("sparkformer_other")
