"""``plugin.register()`` never breaks vLLM, and leaves vLLM's own paths alone when unused.

* Failure injection, in a fresh interpreter (``tests/register_faults.py``): every
  change register() makes to vLLM is made to fail in turn, plus import and API
  failures; each time register() must not raise, must log exactly one error
  naming the feature and the cause, must leave the failed feature's vLLM
  attributes exactly as they were and the other features installed, and vLLM
  must still build an ``auto`` engine configuration.
* Identity, in real in-process engines: with no TTL, the scheduler keeps vLLM's
  ``BlockPool`` and ``KVCacheManager`` classes, and a non-nf4 engine vLLM's
  ``make_stats``.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest

FAULTS = Path(__file__).with_name("register_faults.py")


@pytest.fixture(scope="module")
def faults(model_dir):
    done = subprocess.run(
        [sys.executable, str(FAULTS), str(model_dir)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    sys.path.insert(0, str(FAULTS.parent))
    try:
        from register_faults import RESULT_MARK
    finally:
        sys.path.remove(str(FAULTS.parent))
    line = next(line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK))
    return json.loads(line[len(RESULT_MARK) :])


def test_clean_registration_and_full_undo(faults):
    assert faults["clean_errors"] == [] and faults["clean_nf4_accepted"]
    assert faults["clean_changes"] >= 10  # every change of all three features was made to fail
    assert faults["undone_all_wrong"] == []  # undoing the journal restores every attribute


def test_every_injected_failure_is_contained(faults):
    cases = faults["cases"]
    assert len(cases) == faults["clean_changes"] + 6
    for case in cases:
        (feature,) = case["failed_feature"]
        assert case["raised"] is None, case
        assert len(case["errors"]) == 1, case
        (error,) = case["errors"]
        assert feature in error and "vLLM is unchanged by it" in error, case
        assert case["wrong"] == [], case
        assert case["auto_config_builds"], case
    causes = " ".join(case["errors"][0] for case in cases)
    for cause in ("Injected", "AttributeError", "ModuleNotFoundError", "UnsupportedVLLMError"):
        assert cause in causes


def _engine(model_dir, kv_cache_dtype: str, **kwargs):
    from vllm import LLM

    return LLM(
        model=str(model_dir),
        kv_cache_dtype=kv_cache_dtype,
        enforce_eager=True,
        block_size=32,
        kv_cache_memory_bytes=32 * 2**20,
        max_model_len=1024,
        **kwargs,
    )


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "nf4"])
def test_no_ttl_keeps_vllms_own_classes(model_dir, kv_cache_dtype):
    from vllm import SamplingParams
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    llm = _engine(model_dir, kv_cache_dtype)
    try:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        text = "Call me Ishmael. " * 20
        llm.generate([text, text], SamplingParams(max_tokens=2), use_tqdm=False)
        assert type(scheduler.kv_cache_manager) is KVCacheManager
        assert type(scheduler.kv_cache_manager.block_pool) is BlockPool
        assert not hasattr(Scheduler.make_stats, "_nf4kv_ttl_patch")
        # nf4 adds its memory gauges to the stats; any other dtype keeps vLLM's make_stats
        assert ("make_stats" in vars(scheduler)) == (kv_cache_dtype == "nf4")
    finally:
        del llm
        gc.collect()


def test_a_server_ttl_installs_the_machinery(model_dir):
    from vllm import SamplingParams
    from vllm.v1.core.block_pool import BlockPool

    from vllm_nf4kv.ttl.pool import TTLBlockPoolMixin, vllm_pool_class

    llm = _engine(
        model_dir, "auto", additional_config={"nf4kv": {"prefix_cache_ttl_s": 3600}}, disable_log_stats=False
    )
    try:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        llm.generate(["Call me Ishmael. " * 20], SamplingParams(max_tokens=2), use_tqdm=False)
        pool = scheduler.kv_cache_manager.block_pool
        assert isinstance(pool, TTLBlockPoolMixin) and vllm_pool_class(type(pool)) is BlockPool
        assert "make_stats" in vars(scheduler)
        stats = scheduler.make_stats()
        assert stats.num_kv_fetch_reqs_by_stage["nf4kv:ttl_ms"] == 3_600_000
    finally:
        del llm
        gc.collect()
