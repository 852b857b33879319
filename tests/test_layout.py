"""The layout: imports among the project's modules run one way (README, "Architecture"), function-level ones too."""
import ast

from conftest import ROOT

# Each module below the ones that use it; a module may import only modules earlier in this list.
ORDER = ["data", "search", "evaluate", "rollout", "fused", "parallel", "memory", "grpo", "opsd", "tiny", "train"]


def project_imports() -> dict[str, set[str]]:
    modules = {p.stem for p in ROOT.glob("*.py")}
    graph = {}
    for path in ROOT.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):  # every import, at any depth
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        graph[path.stem] = (found & modules) - {path.stem}
    return graph


def test_every_module_is_placed_in_the_order():
    assert set(project_imports()) == set(ORDER)


def test_imports_run_one_way():
    graph = project_imports()
    for module, imported in graph.items():
        for other in imported:
            assert ORDER.index(other) < ORDER.index(module), f"{module} imports {other}, which sits above it"


def test_no_import_cycle():
    graph = project_imports()
    state = {}

    def visit(m, path):
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        if state.get(m) is None:
            state[m] = "open"
            for other in sorted(graph[m]):
                visit(other, path + [m])
            state[m] = "done"

    for m in graph:
        visit(m, [])


def test_the_testbed_is_used_only_by_the_entry_point():
    graph = project_imports()
    assert [m for m, imported in graph.items() if "tiny" in imported] == ["train"]
