"""The library's layout holds: no import cycles between mr_ray modules, none dodged by an import inside a
function (the CLI alone defers its heavy imports, so `mr-ray --help` answers at once), and only the stages
see a StageContext."""

import ast
from pathlib import Path

import networkx as nx

LIBRARY = Path(__file__).resolve().parents[1] / "mr_ray"
DEFERRING = {"mr_ray.cli"}  # imports torch, Ray Data and Serve per command


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in LIBRARY.rglob("*.py"):
        name = ".".join(path.relative_to(LIBRARY.parent).with_suffix("").parts).removesuffix(".__init__")
        found[name] = ast.parse(path.read_text())
    return found


def mr_ray_imports(tree: ast.Module, known: set[str]) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import of an mr_ray module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in known:
            out.append((node.module, node.col_offset == 0))
        elif isinstance(node, ast.Import):
            out += [(alias.name, node.col_offset == 0) for alias in node.names if alias.name in known]
    return out


def test_the_library_has_no_import_cycles_and_no_imports_hidden_in_functions():
    trees = modules()
    graph = nx.DiGraph()
    hidden = []
    for name, tree in trees.items():
        graph.add_node(name)
        for target, top in mr_ray_imports(tree, set(trees)):
            graph.add_edge(name, target)
            if not top and name not in DEFERRING:
                hidden.append(f"{name} -> {target}")
    assert hidden == []
    assert list(nx.simple_cycles(graph)) == []


def test_only_stages_and_the_pipeline_take_a_stage_context():
    takers = set()
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(arg.arg == "ctx" for arg in node.args.args):
                takers.add(name)
    assert takers - {"mr_ray.pipeline", "mr_ray.cli"} <= {name for name in modules() if name.startswith("mr_ray.stages.")}
    assert {"mr_ray.stages.judge", "mr_ray.stages.train", "mr_ray.stages.mine", "mr_ray.stages.evaluate"} <= takers
