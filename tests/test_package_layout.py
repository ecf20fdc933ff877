"""The package's shape, as the house rules have it (README, "Layout of this repository").

* The import graph (every ``import`` of ``vllm_nf4kv`` modules, lazy ones inside functions
  included) has no cycle: imports flow plugin -> registration -> patches -> vLLM, with
  ``journal`` the leaf every patch goes through.
* No module is longer than ``MAX_MODULE_LINES``: past that a file holds more than one job.
* Nothing outside ``tools/`` imports a tool but the CLI that runs them: measurement and test
  helpers stay off the serving path.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vllm_nf4kv"
MAX_MODULE_LINES = 450
TOOLS = "vllm_nf4kv.tools"
RUNS_THE_TOOLS = "vllm_nf4kv.cli"


def _imports() -> dict[str, set[str]]:
    """Module -> the vllm_nf4kv modules it imports anywhere in its body."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                wanted = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in wanted:
                while target and target not in modules:
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if target and target != name:
                    graph[name].add(target)
    return graph


def test_imports_flow_one_way():
    graph = _imports()
    assert "vllm_nf4kv.journal" in graph and not graph["vllm_nf4kv.journal"]  # the leaf
    cycles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_module_is_over_the_line_limit():
    sources = [path for path in PACKAGE.rglob("*") if path.suffix in {".py", ".cpp", ".h"}]
    lines = {str(path.relative_to(REPO)): len(path.read_text().splitlines()) for path in sources}
    assert {name: n for name, n in lines.items() if n > MAX_MODULE_LINES} == {}


def test_tools_are_off_the_serving_path():
    graph = _imports()
    importers = {
        module
        for module, targets in graph.items()
        if any(t == TOOLS or t.startswith(TOOLS + ".") for t in targets)
        and not (module == TOOLS or module.startswith(TOOLS + ".") or module == RUNS_THE_TOOLS)
    }
    assert importers == set()
