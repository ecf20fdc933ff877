"""The patch index is what is patched, docs/patches.md is the index, and imports flow one way.

* A clean ``plugin.register()`` changes exactly the index's targets
  that apply to the running vLLM (0.32 here: no dtype hook; 0.33 / 0.34 in the CUDA-wheel
  suites: the hook), plus our own module flags; nothing unindexed, nothing indexed missing.
* Every indexed patch function exists where the index says.
* The package's import graph (every ``import`` of ``vllm_nf4kv`` modules, lazy ones inside
  functions included) has no cycle.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from vllm_nf4kv.patches import PATCH_INDEX, index_markdown

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vllm_nf4kv"


def test_a_clean_registration_changes_exactly_the_indexed_targets():
    from vllm.config import cache
    from vllm.platforms import current_platform

    import vllm_nf4kv.plugin as plugin
    from vllm_nf4kv import journal, patches

    plugin.register()  # idempotent: what this process registered, every feature in place
    applies = {"always", "dtype hook" if hasattr(cache, "register_kv_cache_dtype") else "no dtype hook"}
    index = patches.index_targets(type(current_platform))
    expected = {target for target, note in index.items() if note.applies in applies}
    vllm_targets = [target for target in journal.applied() if not target.startswith("vllm_nf4kv.")]
    assert len(vllm_targets) == len(set(vllm_targets))  # each target changed once
    assert set(vllm_targets) == expected


def test_every_indexed_patch_function_exists():
    for note in PATCH_INDEX:
        module, function = note.patch.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(f"vllm_nf4kv.{module}"), function)), note


def test_docs_page_is_the_index():
    page = (REPO / "docs" / "patches.md").read_text()
    assert index_markdown() in page


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
