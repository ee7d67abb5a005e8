"""The import graph inside ``s2v_fast/pipeline/`` runs one way (docs/design.md): no cycle, the
leaf modules (settings, results, interrupts) import nothing of the pipeline, and no module imports
the package's face (``s2v_fast.pipeline`` itself), which imports them all. Built with ``ast``,
function-level imports included."""
import ast
import pathlib

PIPELINE = pathlib.Path(__file__).resolve().parents[1] / "s2v_fast" / "pipeline"
LEAVES = {"settings", "results", "interrupts"}


def _pipeline_imports(path):
    """Modules of s2v_fast/pipeline/ that ``path`` imports ("" = the package's __init__)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.level == 2 and node.module and node.module.split(".")[0] == "pipeline":
                found.add(".".join(node.module.split(".")[1:2]))
            elif node.level == 0 and (node.module or "").startswith("s2v_fast.pipeline"):
                found.add(".".join(node.module.split(".")[2:3]))
        elif isinstance(node, ast.Import):
            found |= {".".join(a.name.split(".")[2:3]) for a in node.names
                      if a.name.startswith("s2v_fast.pipeline")}
    return found


def _graph():
    return {p.stem: _pipeline_imports(p) for p in PIPELINE.glob("*.py") if p.stem != "__init__"}


def _has_cycle(graph):
    done, path = set(), []

    def visit(n):
        if n in path:
            return True
        if n in done:
            return False
        path.append(n)
        if any(visit(m) for m in graph.get(n, ())):
            return True
        path.pop()
        done.add(n)
        return False

    return any(visit(n) for n in graph)


def test_pipeline_import_graph_runs_one_way():
    graph = _graph()
    assert {"s2v_pipeline", "clip_loop", "loading", "placement"} <= set(graph)
    assert not _has_cycle(graph), graph
    for leaf in LEAVES:
        assert not graph[leaf], f"{leaf} imports {graph[leaf]}"
    assert not [m for m, deps in graph.items() if "" in deps], "a module imports the package face"


def test_the_checker_sees_cycles_and_face_imports(tmp_path):
    assert _has_cycle({"a": {"b"}, "b": {"a"}}) and not _has_cycle({"a": {"b"}, "b": set()})
    f = tmp_path / "m.py"
    f.write_text("from . import motion\nfrom ..pipeline import S2VPipeline\n"
                 "def g():\n    from .settings import SAMPLE_FPS\n")
    assert _pipeline_imports(f) == {"motion", "", "settings"}
