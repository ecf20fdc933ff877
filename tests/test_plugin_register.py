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
    assert len(cases) == faults["clean_changes"] + 9
    for case in cases:
        (feature,) = case["failed_feature"]
        assert case["raised"] is None, case
        assert len(case["errors"]) == 1, case
        (error,) = case["errors"]
        assert feature in error and "vLLM is unchanged by it" in error, case
        assert case["wrong"] == [], case
        assert case["auto_config_builds"], case
        # a feature the TTL needs is gone: a TTL is refused, never silently ignored
        refusals = case["ttl_refusals"]
        if "the prefix-cache TTL" in feature:
            assert "the prefix-cache TTL is unavailable" in refusals["server"], case
            assert "the prefix-cache TTL is unavailable" in refusals["request"], case
        else:
            assert refusals == {"server": None, "request": None}, case
    causes = " ".join(case["errors"][0] for case in cases)
    for cause in ("Injected", "AttributeError", "ModuleNotFoundError", "UnsupportedVLLMError"):
        assert cause in causes
    assert "SelfCheckError" in causes


def test_a_failed_self_check_refuses_the_feature_naming_its_step(faults):
    import vllm

    steps = {
        "nf4 routed to vLLM's own kernels (self-check)": "get_attn_backend_cls for an nf4 layer",
        "nf4 pages sized as vLLM's (self-check)": "FullAttentionSpec sized by the nf4 cell",
        "TTL pool tracks no released block (self-check)": "a released cached block is tracked for expiry",
    }
    cases = {case["case"]: case for case in faults["cases"] if case["case"] in steps}
    assert len(cases) == len(steps)
    for name, step in steps.items():
        (feature,) = cases[name]["failed_feature"]
        (error,) = cases[name]["errors"]
        assert f"self-check of {feature} failed on vLLM {vllm.__version__} at step '" in error
        assert step in error, error
    for refusal in cases["TTL pool tracks no released block (self-check)"]["ttl_refusals"].values():
        assert "at step 'a released cached block is tracked for expiry'" in refusal


def test_the_pre_034_ownership_test_fails_the_self_check_exactly_on_034(faults):
    """The mutation the self-check exists for: vLLM 0.34's ``block.pool`` is a weakref.

    With the ownership test the TTL pool had before 0.34 support, registration on 0.34
    refuses the TTL (one error naming the step; a TTL is then a startup error); on
    0.32 and 0.33, where ``block.pool`` is the pool itself, the same test is right.
    """
    outcome = faults["pre_034_ownership"]
    if faults["block_pool_is_weak"]:
        (error,) = outcome["errors"]
        assert "the prefix-cache TTL is unavailable" in error and "tracked for expiry" in error
        assert "tracked for expiry" in outcome["ttl_refusals"]["server"]
    else:
        assert outcome["errors"] == [] and outcome["ttl_refusals"] == {"server": None, "request": None}


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


@pytest.mark.engine
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "nf4"])
def test_no_ttl_keeps_vllms_own_classes(model_dir, kv_cache_dtype):
    from vllm import SamplingParams
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_nf4kv import journal

    llm = _engine(model_dir, kv_cache_dtype)
    try:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        text = "Call me Ishmael. " * 20
        llm.generate([text, text], SamplingParams(max_tokens=2), use_tqdm=False)
        assert type(scheduler.kv_cache_manager) is KVCacheManager
        assert type(scheduler.kv_cache_manager.block_pool) is BlockPool
        assert not journal.is_wrapper(Scheduler.make_stats)
        # nf4 adds its memory gauges to the stats; any other dtype keeps vLLM's make_stats
        assert ("make_stats" in vars(scheduler)) == (kv_cache_dtype == "nf4")
    finally:
        del llm
        gc.collect()


@pytest.mark.engine
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
