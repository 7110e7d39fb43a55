"""One-way imports: every module imports on its own, and the import graph has no cycle."""
import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fxq", "passes")
# The public API on top of the pipeline: these run passes, so they may import them (the command
# reads the pipeline's order of names). Nothing else in fxq may, so a pass can import any core
# module without a cycle.
API_LAYER = {"fxq", "fxq.api", "fxq.analysis.mixed", "fxq.analysis.comparison", "fxq.analysis.explanation",
             "fxq.analysis.evaluation", "fxq.cli.main"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("**/*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    """The project modules a file imports at module level (function-level imports run later)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.split(".")[0] in PACKAGES}


def _graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        graph.add_edges_from((name, target) for target in _imports(path) if target in modules and target != name)
    return graph


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert nx.is_directed_acyclic_graph(graph), nx.find_cycle(graph)


def test_only_the_api_layer_imports_the_passes():
    graph = _graph()
    importers = {a for a, b in graph.edges if b.startswith("passes") and a.startswith("fxq")}
    assert importers <= API_LAYER, importers - API_LAYER


@pytest.mark.real_data  # a fresh interpreter of its own
def test_every_module_imports_on_its_own():
    # one interpreter (torch loads once); the project's modules are dropped between imports
    script = (
        "import importlib, sys\n"
        f"for name in {sorted(_modules())!r}:\n"
        f"    for loaded in [m for m in sys.modules if m.split('.')[0] in {PACKAGES!r}]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as error:\n"
        "        print(name, type(error).__name__, error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "", result.stdout


def test_no_pass_names_an_op_entry():
    """Passes find the entries they need by a declared role (``residual_join``, ``concatenates``,
    ...), so an entry can be added, moved or split without touching a pass."""
    import importlib

    from fxq.ops import Op
    named = []
    for path in sorted((ROOT / "passes").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fxq.ops"):
                source = importlib.import_module(node.module)
                named += [f"{path.name}: {alias.name}" for alias in node.names
                          if isinstance(getattr(source, alias.name, None), Op)]
    assert not named, named


def test_fxq_is_a_handful_of_folders_and_the_old_module_paths_still_import():
    import importlib

    import fxq
    top = sorted(p.name for p in (ROOT / "fxq").iterdir() if p.name != "__pycache__")
    folders = [name for name in top if (ROOT / "fxq" / name).is_dir()]
    assert set(top) - set(folders) <= {"__init__.py", "api.py", "config.py", "distributed.py"}, top
    assert len(folders) <= 8
    for module, folder in fxq._MOVED.items():
        old, new = importlib.import_module(f"fxq.{module}"), importlib.import_module(f"fxq.{folder}.{module}")
        public = [name for name in vars(new) if not name.startswith("_")]
        assert all(getattr(old, name) is getattr(new, name) for name in public), module
    from fxq.runtime import count_ops
    assert count_ops is importlib.import_module("fxq.graphs.runtime").count_ops
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("fxq.no_such_module")
