"""The patch index is what is patched, and docs/patches.md is the index.

* A clean ``plugin.register()`` changes exactly the index's targets
  that apply to the running vLLM (0.32 here: no dtype hook; 0.33 / 0.34 in the CUDA-wheel
  suites: the hook), plus our own module flags; nothing unindexed, nothing indexed missing.
* Every indexed patch function exists where the index says.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from vllm_nf4kv.patches import PATCH_INDEX, index_markdown

REPO = Path(__file__).resolve().parents[1]


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
