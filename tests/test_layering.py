"""The package's layering (README, "Layout"): lm_align's import graph, read from the source.

Every `import` and `from ... import` counts, including those inside functions
(a lazy import is still a dependency). A module may import modules of a lower
layer only; within a layer, only its own package. Private names (`_x`) are
not imported across packages. Orchestration code keeps functions on one
screen and its main modules small.
"""

import ast
import os

import pytest

from tests.helpers import REPO

# Lowest first. A module's layer is that of its longest matching prefix.
LAYERS = [
    ("lm_align.utils", "lm_align.optim"),
    ("lm_align.config", "lm_align.distributed", "lm_align.parameterization"),
    ("lm_align.models", "lm_align.losses", "lm_align.data", "lm_align.parallel"),
    ("lm_align.sampling",),
    ("lm_align.train", "lm_align.launch"),
    ("lm_align.align", "lm_align.sweeps"),
    ("lm_align.presets", "lm_align.bench", "lm_align.coordcheck"),
    ("lm_align.aot",),
    ("lm_align.cli", "lm_align"),
]
ORCHESTRATION = ("lm_align/align", "lm_align/train", "lm_align/sweeps", "lm_align/launch",
                 "lm_align/cli.py", "lm_align/bench.py", "lm_align/coordcheck.py",
                 "lm_align/aot")  # fmt: skip
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = {"lm_align/align/trainer.py": 400, "lm_align/launch/tpu.py": 400,
                    "lm_align/align/datagen.py": 400}  # fmt: skip


def _modules() -> dict[str, str]:
    out = {}
    for root, _, names in os.walk(os.path.join(REPO, "lm_align")):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                mod = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[mod.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(mod: str, path: str) -> list[tuple[str, str | None, int]]:
    """(imported lm_align module, imported name or None, line) for every import in `path`."""
    pkg = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full if full in MODULES else base, a.name, node.lineno))
    return [(t, n, line) for t, n, line in out if t in MODULES and t != mod]


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _layer(mod: str) -> tuple[int, str]:
    """(layer index, the prefix that matched) of a module."""
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    assert best is not None, mod
    return best


def _is_package_init(mod: str) -> bool:
    return MODULES[mod].endswith("__init__.py")


def test_no_import_cycles():
    """Tarjan's strongly connected components over module -> imported module."""
    adj = {m: sorted({t for t, _, _ in GRAPH[m] if not _is_package_init(t)}) for m in GRAPH}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in adj[v]:
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
                cycles.append(sorted(component))

    for v in adj:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_upward_or_sideways_imports():
    bad = []
    for mod, imports in sorted(GRAPH.items()):
        if _is_package_init(mod):
            continue  # a package's __init__ re-exports its own modules
        layer, prefix = _layer(mod)
        for target, _, line in imports:
            t_layer, t_prefix = _layer(target)
            if t_layer > layer or (t_layer == layer and t_prefix != prefix):
                bad.append(f"{MODULES[mod]}:{line}: {mod} (layer {layer}) imports {target} "
                           f"(layer {t_layer})")  # fmt: skip
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_private_names_across_packages():
    def package(mod):
        return _layer(mod)[1]

    bad = [
        f"{MODULES[mod]}:{line}: {mod} imports {target}.{name}"
        for mod, imports in sorted(GRAPH.items())
        for target, name, line in imports
        if name and name.startswith("_") and package(mod) != package(target)
    ]
    assert not bad, "private names imported across packages:\n" + "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path):
    """Negative control: a train module importing align is caught by the same rules."""
    path = tmp_path / "loop.py"
    path.write_text("def f():\n    from lm_align.align import trainer\n")
    imports = _imports("lm_align.train.loop", str(path))
    assert imports == [("lm_align.align.trainer", "trainer", 2)]
    assert _layer("lm_align.align.trainer")[0] > _layer("lm_align.train.loop")[0]


def _functions(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def _orchestration_files():
    for path in sorted(MODULES.values()):
        rel = os.path.relpath(path, REPO)
        if rel.startswith(ORCHESTRATION):
            yield rel, path


@pytest.mark.parametrize("rel,path", list(_orchestration_files()), ids=lambda x: x)
def test_orchestration_functions_fit_on_a_screen(rel, path):
    long = [f"{rel}:{line} {name} ({n} lines)" for name, line, n in _functions(path)
            if n > MAX_FUNCTION_LINES]  # fmt: skip
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("rel,limit", sorted(MAX_MODULE_LINES.items()))
def test_main_orchestration_modules_stay_small(rel, limit):
    with open(os.path.join(REPO, rel)) as f:
        n = sum(1 for _ in f)
    assert n < limit, f"{rel} has {n} lines (limit {limit}): split it by job"
