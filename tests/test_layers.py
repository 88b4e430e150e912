"""Imports point one way: config -> specs -> model -> cache/engine -> runtime -> api -> cli.

Reads every module's import statements (module level and inside functions) with `ast`,
so a new upward import, or an import cycle, fails here before anyone has to untangle it.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("ftjax", "converters", "pallas_kernels")

# Lower numbers are lower layers; a module may import only modules of a layer <= its own
# (the same layer: no cycle allowed either). Unlisted modules of a package take its default.
LAYERS = {
    "ftjax.errors": 0, "ftjax.timing": 0, "ftjax.config": 0, "ftjax.numerics": 0, "ftjax.buckets": 0,
    "ftjax.assets": 0, "ftjax.sampling": 0, "ftjax.hf_compat": 0, "ftjax.fits": 0,
    "ftjax.pipeline": 0,  # the stage schedule: jax only (model and sharding use it)
    "ftjax.tokenizer": 1, "ftjax.processors": 1,
    "ftjax.specs": 1,
    "pallas_kernels": 2, "ftjax.quant": 3, "ftjax.sharding": 4,
    "converters": 5,
    "ftjax.cache": 6, "ftjax.paged_kv": 6, "ftjax.paged_cache": 6, "ftjax.blocks": 0, "ftjax.model": 7, "ftjax.engine": 8, "ftjax.smoothquant": 8,
    "ftjax.batching": 9, "ftjax.beam": 9, "ftjax.generation": 10, "ftjax.serving": 10, "ftjax.session": 11, "ftjax.streaming": 11,
    "ftjax.api": 12, "ftjax": 12,
    "ftjax.evaluate": 13, "ftjax.plan": 13, "ftjax.bench": 13, "ftjax.bench_hf": 13, "ftjax.distributed": 13,
    "ftjax.cli": 14, "ftjax.__main__": 15,
}


def _modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            yield ".".join(parts), path


def _layer(name: str):
    while name:
        if name in LAYERS:
            return LAYERS[name]
        name = name.rpartition(".")[0]
    return None


def _imports(path: pathlib.Path, name: str):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from ftjax import quant` imports the submodule ftjax.quant
            targets = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in PACKAGES:
                yield t


def _graph():
    mods = dict(_modules())
    graph = {}
    for name, path in mods.items():
        deps = set()
        for t in _imports(path, name):
            while t and t not in mods:  # `from ftjax.api import Model` -> ftjax.api
                t = t.rpartition(".")[0]
            if t and t != name and not (name == "ftjax" and t.startswith("ftjax.")):
                deps.add(t)
        graph[name] = deps
    return graph


def test_every_module_has_a_layer():
    missing = [m for m, _ in _modules() if _layer(m) is None]
    assert not missing, f"add these modules to LAYERS: {missing}"


def test_imports_point_down():
    graph = _graph()
    upward = [(m, d) for m, deps in graph.items() for d in deps
              if _layer(d) > _layer(m) and not (m.startswith("ftjax.cli") or m == "ftjax.__main__")]
    assert not upward, "upward imports (module -> a higher layer): " + ", ".join(
        f"{m} -> {d}" for m, d in sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in graph.get(m, ()):
            if state.get(d) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
