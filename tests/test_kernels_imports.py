"""The import graph of ``s2v_fast/kernels/``: no cycle, nothing from ``models/``.

Built from the source with ``ast`` (function-level imports included, since a lazy import is as
much a dependency as a top-level one), so a cycle hidden inside a function fails here too. The
kernels may use ``s2v_fast.options`` and ``s2v_fast.errors`` (both leaves) and nothing else of the
package, except the one lazy re-export benchmarks still use (``fp8_attention.make_realistic_qkv``,
moved to ``s2v_fast.testing``).
"""
import ast
import os
import pathlib
import subprocess
import sys

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "s2v_fast" / "kernels"
PACKAGE = "s2v_fast.kernels"
# leaves of the package (they import nothing of it but errors): options, the attention sites
ALLOWED_OUTSIDE = {"s2v_fast.options", "s2v_fast.errors", "s2v_fast.attention_sites"}
# (module, imported module, the function it is imported in): re-exports kept for bench/
LAZY_REEXPORTS = {("fp8_attention", "s2v_fast.testing.attention_inputs", "__getattr__")}


def _imports(path: pathlib.Path):
    """(imported module, enclosing function or None) for every import statement of the file."""
    modules = {p.stem for p in KERNELS.glob("*.py")}
    found = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Import):
                found.extend((a.name, func) for a in child.names if a.name.startswith("s2v_fast"))
            elif isinstance(child, ast.ImportFrom):
                if child.level == 0:
                    if (child.module or "").startswith("s2v_fast"):
                        found.append((child.module, func))
                    continue
                base = PACKAGE.rsplit(".", child.level - 1)[0] if child.level > 1 else PACKAGE
                if child.module:
                    found.append((f"{base}.{child.module}", func))
                else:  # from . import x: x is a module of the package
                    found.extend((f"{base}.{a.name}", func) for a in child.names
                                 if child.level > 1 or a.name in modules)
            visit(child, inner)

    visit(ast.parse(path.read_text()), None)
    return found


def _graph():
    graph, outside = {}, []
    for path in sorted(KERNELS.glob("*.py")):
        name = path.stem
        graph[name] = set()
        for mod, func in _imports(path):
            if mod.startswith(PACKAGE + "."):
                graph[name].add(mod[len(PACKAGE) + 1:].split(".")[0])
            elif mod != PACKAGE:
                outside.append((name, mod, func))
    return graph, outside


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def dfs(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = dfs(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = dfs(n)
            if found:
                return found
    return None


def test_kernels_import_graph_is_acyclic():
    graph, _ = _graph()
    assert "registry" in graph and not graph["registry"], graph.get("registry")
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    for backend in ("cuda_attention", "fp8_attention", "flash_attention", "sdpa", "auto"):
        assert "attention" not in graph[backend], f"{backend} imports the dispatcher"


def test_kernels_import_nothing_from_models():
    _, outside = _graph()
    assert not [o for o in outside if o[1].startswith("s2v_fast.models")], outside
    unexpected = [o for o in outside if o[1] not in ALLOWED_OUTSIDE and o not in LAZY_REEXPORTS]
    assert not unexpected, unexpected


def test_cycle_finder_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_importing_every_kernel_module_loads_no_model_module():
    names = sorted(p.stem for p in KERNELS.glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for n in {names!r}: importlib.import_module('{PACKAGE}.' + n)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('s2v_fast.models', 's2v_fast.testing'))))")
    env = dict(os.environ, PYTHONPATH=str(KERNELS.parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
