"""The TTL policy on vLLM's real ``BlockPool``, its patches and its metrics path.

Scenario tests with an injected clock (the random sequences are in
``test_ttl_pool_property.py``); the patches installed by ``register()``; the
stats payload through vLLM's real msgspec transport and ``StatLoggerManager``;
KV-memory figures from real vLLM KV-cache specs.
"""

from __future__ import annotations

import pytest

BLOCK_SIZE = 4


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def vllm_parts():
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK_SIZE, sha256)
    counter = iter(range(10**9))

    def request(tokens):
        params = SamplingParams(max_tokens=1)
        return Request(f"r{next(counter)}", list(tokens), params, None, block_hasher=hasher)

    return BlockPool, request


def make_pool(vllm_parts, ttl, num_blocks=12, **kwargs):
    from vllm_nf4kv.ttl.pool import enable_ttl

    block_pool_cls, _ = vllm_parts
    pool = block_pool_cls(num_gpu_blocks=num_blocks, enable_caching=True, hash_block_size=BLOCK_SIZE)
    clock = Clock()
    state = enable_ttl(pool, ttl, clock=clock, **kwargs)
    return pool, clock, state


def run_prompt(pool, request):
    """What vLLM's KV-cache manager does for one request: hits, touch, new blocks, cache."""
    hits = []
    for block_hash in request.block_hashes:
        found = pool.get_cached_block(block_hash, [0])
        if found is None:
            break
        hits.append(found[0])
    pool.touch(hits)
    needed = -(-request.num_tokens // BLOCK_SIZE)
    blocks = hits + pool.get_new_blocks(needed - len(hits))
    pool.cache_full_blocks(request, blocks, len(hits), len(request.block_hashes), BLOCK_SIZE, 0)
    return blocks, len(hits)


def queue_ids(pool):
    return [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]


def test_hit_within_ttl_miss_after(vllm_parts):
    pool, clock, state = make_pool(vllm_parts, ttl=2.0)
    _, request = vllm_parts
    prompt = range(10)  # two full blocks and a partial one
    blocks, hits = run_prompt(pool, request(prompt))
    assert hits == 0
    pool.free_blocks(reversed(blocks))
    clock.now = 2.0  # exactly the TTL: not older than it
    blocks, hits = run_prompt(pool, request(prompt))
    assert hits == 2
    pool.free_blocks(reversed(blocks))
    clock.now = 4.01
    blocks, hits = run_prompt(pool, request(prompt))
    assert hits == 0
    assert state.expired_blocks == 2
    pool.free_blocks(reversed(blocks))


def test_held_blocks_never_expire(vllm_parts):
    pool, clock, state = make_pool(vllm_parts, ttl=1.0)
    _, request = vllm_parts
    held, _ = run_prompt(pool, request(range(8)))
    clock.now = 100.0
    other, hits = run_prompt(pool, request(range(8)))  # shares the held prefix
    assert hits == 2 and state.expired_blocks == 0
    pool.free_blocks(reversed(held))
    pool.free_blocks(reversed(other))
    clock.now = 100.5  # released at 100.0: still fresh
    blocks, hits = run_prompt(pool, request(range(8)))
    assert hits == 2


def test_expired_blocks_go_to_the_front_and_are_reused_first(vllm_parts):
    pool, clock, state = make_pool(vllm_parts, ttl=5.0, num_blocks=8)
    _, request = vllm_parts
    old, _ = run_prompt(pool, request([1] * 8))  # 2 full blocks
    pool.free_blocks(reversed(old))
    clock.now = 3.0
    young, _ = run_prompt(pool, request([2] * 8))
    pool.free_blocks(reversed(young))
    clock.now = 6.0  # `old` expired, `young` not
    assert pool.nf4kv_sweep() == 2
    front = queue_ids(pool)[:2]
    assert sorted(front) == sorted(b.block_id for b in old)
    assert all(pool.blocks[i].block_hash is None for i in front)
    # a new allocation takes the expired blocks first, never the young cached ones
    new = pool.get_new_blocks(2)
    assert sorted(b.block_id for b in new) == sorted(front)
    assert all(b.block_hash is not None for b in young)
    pool.free_blocks(new)


def test_lru_order_among_fresh_blocks_is_vllms(vllm_parts):
    """With a TTL that never fires, the pool behaves exactly like vLLM's."""
    block_pool_cls, request = vllm_parts
    ttl_pool, clock, _ = make_pool(vllm_parts, ttl=1000.0, num_blocks=10)
    plain = block_pool_cls(num_gpu_blocks=10, enable_caching=True, hash_block_size=BLOCK_SIZE)
    prompts = [[1] * 8, [2] * 8, [1] * 4 + [3] * 4, [4] * 8, [2] * 8, [5] * 12, [1] * 8]
    for step, prompt in enumerate(prompts):
        clock.now = float(step)
        results = []
        for pool in (ttl_pool, plain):
            blocks, hits = run_prompt(pool, request(prompt))
            pool.free_blocks(reversed(blocks))
            results.append((hits, [b.block_id for b in blocks], queue_ids(pool)))
        assert results[0] == results[1]


def test_sweep_is_bounded_per_operation(vllm_parts):
    pool, clock, state = make_pool(vllm_parts, ttl=1.0, num_blocks=40, sweep_budget=4)
    _, request = vllm_parts
    for i in range(8):
        blocks, _ = run_prompt(pool, request([i] * 16))  # 4 full blocks each
        pool.free_blocks(reversed(blocks))
    assert len(state.released) == 32
    clock.now = 5.0
    first, _ = run_prompt(pool, request([99] * 4))
    assert state.expired_blocks == 4  # one bounded sweep, before the allocation
    assert len(state.released) == 28
    pool.free_blocks(first)  # one more bounded sweep
    assert state.expired_blocks == 8
    assert pool.nf4kv_sweep() == 24  # the rest, when asked for all
    assert state.expired_blocks == 32 and list(state.released) == [first[0].block_id]


def test_ttl_off_only_counts(vllm_parts):
    pool, clock, state = make_pool(vllm_parts, ttl=None)
    _, request = vllm_parts
    blocks, _ = run_prompt(pool, request(range(10)))
    assert state.cached_blocks == 2
    pool.free_blocks(reversed(blocks))
    clock.now = 10**6
    _, hits = run_prompt(pool, request(range(10)))
    assert hits == 2 and state.expired_blocks == 0 and not state.released


def test_reset_prefix_cache(vllm_parts):
    pool, clock, state = make_pool(vllm_parts, ttl=1.0)
    _, request = vllm_parts
    blocks, _ = run_prompt(pool, request(range(12)))
    pool.free_blocks(reversed(blocks))
    clock.now = 5.0
    assert pool.reset_prefix_cache()
    assert state.expired_blocks == 3  # counted before the wipe
    assert state.cached_blocks == 0 and not state.released


def test_no_ttl_without_prefix_caching(vllm_parts):
    from vllm_nf4kv.ttl.pool import enable_ttl

    block_pool_cls, _ = vllm_parts
    pool = block_pool_cls(num_gpu_blocks=4, enable_caching=False, hash_block_size=BLOCK_SIZE)
    assert enable_ttl(pool, 5.0).ttl_s is None


def test_enable_again_switches_mode_and_keeps_counters(vllm_parts):
    from vllm_nf4kv.ttl.pool import TTLBlockPoolMixin, enable_ttl, vllm_pool_class

    block_pool_cls, request = vllm_parts
    pool, clock, state = make_pool(vllm_parts, ttl=2.0)
    run_prompt(pool, request(range(8)))
    cls = type(pool)
    assert enable_ttl(pool, 3.0, clock=clock).cached_blocks == 2 and type(pool) is cls
    off = enable_ttl(pool, None)  # counting only: vLLM's own lookup and release paths
    assert not isinstance(pool, TTLBlockPoolMixin) and off.cached_blocks == 2
    assert vllm_pool_class(type(pool)) is vllm_pool_class(cls) is block_pool_cls
    assert type(pool).get_cached_block is block_pool_cls.get_cached_block


# -- request TTLs: the tightest bound among the requests that used a block ---------------


def run_with_ttl(pool, request, ttl):
    """``run_prompt`` inside the request's TTL scope, as the scheduler's manager runs it."""
    from vllm_nf4kv.ttl.pool import request_ttl_scope

    with request_ttl_scope(pool, ttl):
        return run_prompt(pool, request)


def test_request_ttl_without_a_server_ttl(vllm_parts):
    pool, clock, state = make_pool(vllm_parts, ttl=None, request_ttls=True)
    _, request = vllm_parts
    blocks, _ = run_with_ttl(pool, request(range(8)), 10.0)
    pool.free_blocks(reversed(blocks))
    clock.now = 10.0  # exactly its TTL: not older than it
    blocks, hits = run_with_ttl(pool, request(range(8)), None)  # a request without a TTL hits
    assert hits == 2
    pool.free_blocks(reversed(blocks))  # released at 10.0: the TTL of 10 s still binds
    clock.now = 20.5
    blocks, hits = run_with_ttl(pool, request(range(8)), None)
    assert hits == 0 and (state.expired_by_request, state.expired_by_server) == (2, 0)
    pool.free_blocks(reversed(blocks))  # new content, no TTL: cached for good (LRU only)
    clock.now = 1e6
    assert run_with_ttl(pool, request(range(8)), None)[1] == 2


def test_zero_ttl_is_never_a_hit_after_release(vllm_parts):
    pool, clock, state = make_pool(vllm_parts, ttl=None, request_ttls=True)
    _, request = vllm_parts
    shared, _ = run_with_ttl(pool, request(range(8)), None)  # someone caches a prefix
    pool.free_blocks(reversed(shared))
    clock.now = 1.0
    private, hits = run_with_ttl(pool, request(range(8)), 0.0)  # a ttl-0 request still hits it...
    assert hits == 2
    clock.now = 2.0
    pool.free_blocks(reversed(private))
    clock.now = 2.000001
    assert run_with_ttl(pool, request(range(8)), None)[1] == 0  # ...and nobody does after it
    assert state.expired_by_request == 2


def test_a_longer_ttl_never_extends_a_shorter_one(vllm_parts):
    pool, clock, state = make_pool(vllm_parts, ttl=None, request_ttls=True)
    _, request = vllm_parts
    blocks, _ = run_with_ttl(pool, request(range(8)), 5.0)
    pool.free_blocks(reversed(blocks))
    clock.now = 1.0
    blocks, hits = run_with_ttl(pool, request(range(8)), 3600.0)  # another tenant, a longer TTL
    assert hits == 2
    pool.free_blocks(reversed(blocks))  # last use at 1.0; the block's TTL stays 5 s
    clock.now = 6.5
    assert run_with_ttl(pool, request(range(8)), 3600.0)[1] == 0
    assert state.expired_by_request == 2


def test_held_blocks_never_expire_under_a_request_ttl(vllm_parts):
    pool, clock, _ = make_pool(vllm_parts, ttl=None, request_ttls=True)
    _, request = vllm_parts
    held, _ = run_with_ttl(pool, request(range(8)), 0.0)
    clock.now = 100.0
    other, hits = run_with_ttl(pool, request(range(8)), None)  # shares the held prefix
    assert hits == 2
    pool.free_blocks(reversed(held))
    assert run_with_ttl(pool, request(range(8)), None)[1] == 2  # `other` still holds it
    pool.free_blocks(reversed(other))


def test_request_and_server_ttls_tightest_wins_with_its_cause(vllm_parts):
    pool, clock, state = make_pool(vllm_parts, ttl=10.0, request_ttls=True, num_blocks=16)
    _, request = vllm_parts
    short, _ = run_with_ttl(pool, request([1] * 8), 2.0)  # tighter than the server's
    long, _ = run_with_ttl(pool, request([2] * 8), 60.0)  # looser: the server's 10 s binds
    pool.free_blocks(reversed(short))
    pool.free_blocks(reversed(long))
    clock.now = 3.0
    assert pool.nf4kv_sweep() == 2 and (state.expired_by_request, state.expired_by_server) == (2, 0)
    blocks, hits = run_with_ttl(pool, request([2] * 8), None)
    assert hits == 2
    pool.free_blocks(reversed(blocks))  # last use at 3.0
    clock.now = 3.0 + 10.5
    assert pool.nf4kv_sweep() == 2 and (state.expired_by_request, state.expired_by_server) == (2, 2)


def test_allocation_takes_every_expired_block_first_even_out_of_release_order(vllm_parts):
    """A short request TTL expires blocks released after live ones; reuse still takes them first."""
    pool, clock, state = make_pool(vllm_parts, ttl=None, request_ttls=True, num_blocks=9, sweep_budget=1)
    _, request = vllm_parts
    live, _ = run_with_ttl(pool, request([1] * 8), 100.0)
    pool.free_blocks(reversed(live))
    dead = []
    for token in (2, 3):
        blocks, _ = run_with_ttl(pool, request([token] * 8), 1.0)
        pool.free_blocks(reversed(blocks))
        dead += blocks
    clock.now = 5.0
    taken = pool.get_new_blocks(4)  # four expired blocks sit behind two live ones
    assert sorted(b.block_id for b in taken) == sorted(b.block_id for b in dead)
    assert all(b.block_hash is not None for b in live) and state.expired_by_request == 4


def test_request_ttls_off_ignore_the_scope(vllm_parts):
    pool, clock, state = make_pool(vllm_parts, ttl=None)
    _, request = vllm_parts
    blocks, _ = run_with_ttl(pool, request(range(8)), 0.0)
    pool.free_blocks(reversed(blocks))
    clock.now = 100.0
    assert run_with_ttl(pool, request(range(8)), None)[1] == 2 and not state.request_ttl


# -- the patches ---------------------------------------------------------------------


def test_register_installs_each_patch_once():
    import vllm_nf4kv.plugin as plugin
    from vllm_nf4kv import journal, patches
    from vllm_nf4kv.ttl import patches as ttl_patches

    plugin.register()
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.metrics.loggers import StatLoggerManager

    from vllm_nf4kv.ttl import engine

    targets = (
        Scheduler.__init__,
        Scheduler.add_request,
        StatLoggerManager.__init__,
        EngineArgs.create_engine_config,
        InputProcessor._validate_params,
    )
    assert all(journal.is_wrapper(t) for t in targets)
    assert engine.SCHEDULER_HOOKED and engine.REQUESTS_HOOKED and engine.STATS_HOOKED
    assert not journal.is_wrapper(Scheduler.make_stats)  # only ever per instance
    mark = journal.mark()
    ttl_patches.install_ttl()  # again: nothing is wrapped twice
    patches.validate_engine_config()
    patches.validate_request_args()
    assert journal.mark() == mark  # nothing changed twice
    for target in targets:
        assert not journal.is_wrapper(target.__wrapped__)


def test_pools_not_built_by_the_scheduler_stay_vllms():
    import vllm_nf4kv.plugin as plugin

    plugin.register()
    from vllm.v1.core import block_pool, kv_cache_coordinator

    # the CPU-offload manager builds its pools through the coordinator's name
    assert kv_cache_coordinator.BlockPool is block_pool.BlockPool
    pool = kv_cache_coordinator.BlockPool(num_gpu_blocks=4, enable_caching=True, hash_block_size=16)
    assert type(pool) is block_pool.BlockPool


# -- metrics: engine core -> msgspec -> front end ---------------------------------------


def test_payload_crosses_vllms_transport_and_reaches_prometheus():
    import vllm_nf4kv.plugin as plugin

    plugin.register()
    from prometheus_client import REGISTRY
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from vllm_nf4kv.ttl import metrics
    from vllm_nf4kv.ttl.frontend import TTLStatLogger

    stats = SchedulerStats(num_kv_fetch_reqs_by_stage={"in_progress": 1})
    stats.num_kv_fetch_reqs_by_stage.update(
        {
            metrics.PAYLOAD_EXPIRED: 3,
            metrics.PAYLOAD_EXPIRED_REQUEST: 4,
            metrics.PAYLOAD_CACHED: 7,
            metrics.PAYLOAD_TTL_MS: 2500,
            metrics.PAYLOAD_KV_BYTES: 100,
            metrics.PAYLOAD_KV_BF16_BYTES: 400,
        }
    )
    frames = MsgpackEncoder().encode(EngineCoreOutputs(engine_index=5, scheduler_stats=stats))
    received = MsgpackDecoder(EngineCoreOutputs).decode(frames).scheduler_stats

    class Config:  # the one field TTLStatLogger reads
        class model_config:
            served_model_name = "ttl-test"

    stat_logger = TTLStatLogger(Config(), [5])
    stat_logger.record(received, None, engine_idx=5)
    assert received.num_kv_fetch_reqs_by_stage == {"in_progress": 1}  # vLLM's loggers see only theirs
    labels = {"model_name": "ttl-test", "engine": "5"}
    by_server = {**labels, "cause": metrics.CAUSE_SERVER}
    by_request = {**labels, "cause": metrics.CAUSE_REQUEST}
    assert REGISTRY.get_sample_value(f"{metrics.METRIC_EXPIRED}_total", by_server) == 3
    assert REGISTRY.get_sample_value(f"{metrics.METRIC_EXPIRED}_total", by_request) == 4
    assert REGISTRY.get_sample_value(metrics.METRIC_CACHED, labels) == 7
    assert REGISTRY.get_sample_value(metrics.METRIC_TTL, labels) == 2.5
    assert REGISTRY.get_sample_value(metrics.METRIC_KV_BF16_BYTES, labels) == 400
    received.num_kv_fetch_reqs_by_stage[metrics.PAYLOAD_EXPIRED] = 2  # the next step's delta
    stat_logger.record(received, None, engine_idx=5)
    assert REGISTRY.get_sample_value(f"{metrics.METRIC_EXPIRED}_total", by_server) == 5
    assert REGISTRY.get_sample_value(f"{metrics.METRIC_EXPIRED}_total", by_request) == 4
    assert received.num_kv_fetch_reqs_by_stage == {"in_progress": 1}


def test_ttl_off_shows_as_infinite():
    from vllm_nf4kv.ttl.metrics import ttl_from_ms, ttl_to_ms

    assert ttl_from_ms(ttl_to_ms(None)) == float("inf")
    assert ttl_from_ms(ttl_to_ms(0.25)) == 0.25


@pytest.mark.parametrize(
    ("dtype", "packed_bytes", "ratio"),
    [("bfloat16", None, 1.0), ("float8_e4m3fn", None, 0.5), ("uint8", 72, 72 / 256)],
)
def test_kv_memory_against_bf16(dtype, packed_bytes, ratio):
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from vllm_nf4kv.ttl.metrics import kv_memory

    spec = FullAttentionSpec(
        block_size=16,
        num_kv_heads=2,
        head_size=64,
        dtype=getattr(torch, dtype),
        state_content_bytes=packed_bytes,
    )
    config = KVCacheConfig(
        num_blocks=10,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(layer_names=["l0", "l1", "l2"], kv_cache_spec=spec)],
    )
    actual, bf16 = kv_memory(config)
    assert bf16 == 10 * 3 * 16 * 2 * (64 + 64) * 2
    assert actual == pytest.approx(ratio * bf16)


def test_kv_memory_of_a_hybrid_model_counts_shared_tensors_once():
    """Gemma 3's groups (full and sliding) share each tensor: memory is the tensors', not pages x layers."""
    import torch
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
        SlidingWindowSpec,
    )

    from vllm_nf4kv.ttl.metrics import kv_memory

    shape = dict(block_size=16, num_kv_heads=1, head_size=256, dtype=torch.uint8, state_content_bytes=264)
    full, sliding = FullAttentionSpec(**shape), SlidingWindowSpec(sliding_window=512, **shape)
    page = full.page_size_bytes
    config = KVCacheConfig(
        num_blocks=10,
        # one backing allocation of 2 layers x 10 blocks, each group's layers overlaid on it
        kv_cache_tensors=[
            KVCacheTensor(size=2 * 10 * page, layers=layers, layer_stride=10 * page, block_stride=page)
            for layers in (["full0", "full1"], ["slide0", "slide1"])
        ],
        kv_cache_groups=[
            KVCacheGroupSpec(layer_names=["full0", "full1"], kv_cache_spec=full),
            KVCacheGroupSpec(layer_names=["slide0", "slide1"], kv_cache_spec=sliding),
        ],
    )
    actual, bf16 = kv_memory(config)
    assert actual == 2 * 10 * page  # the allocation once, not four layers' pages
    assert bf16 == 2 * 10 * 16 * 256 * 2 * 2


# -- content that stays or moves keeps its request TTLs (vLLM's hash promotions and moves) ----

CACHE_BLOCK = 2 * BLOCK_SIZE  # a cache block of two hash blocks, as hybrid models have


def merged_hash(request):
    """The prefix-cache key of the request's first cache block (two hash blocks)."""
    from vllm.v1.core.kv_cache_utils import resolve_block_hashes

    return resolve_block_hashes(request.block_hashes, BLOCK_SIZE, CACHE_BLOCK)[0]


def test_a_partial_block_promoted_to_full_keeps_its_request_ttl(vllm_parts):
    """vLLM replaces a held block's partial hash with the full one as its request fills it.

    Before: the replacement counted as new content, the TTL-0 request's tokens lost their
    TTL and stayed a hit for good (10 s later here).
    """
    from vllm_nf4kv.ttl.pool import request_ttl_scope

    pool, clock, state = make_pool(vllm_parts, ttl=None, request_ttls=True)
    _, request = vllm_parts
    private = request(range(6))  # the prompt ends inside the cache block: a partial entry
    with request_ttl_scope(pool, 0.0):
        blocks = pool.get_new_blocks(1)
        pool.cache_partial_block(private, blocks[0], 4, 0, CACHE_BLOCK)
    assert blocks[0].block_hash is not None
    private.append_output_token_ids([6, 7])  # decoding fills the block
    pool.cache_full_blocks(private, blocks, 0, 1, CACHE_BLOCK, 0)  # partial -> full
    pool.free_blocks(blocks)
    clock.now = 10.0
    assert pool.get_cached_block(merged_hash(private), [0]) is None
    assert state.expired_by_request == 1


def test_a_moved_cache_entry_keeps_the_tightest_request_ttl(vllm_parts):
    """vLLM moves a cache entry to a private copy (``move_block_hashes``, Mamba align mode).

    A TTL-0 request hit the source's content; the copy is allocated outside any TTL scope.
    Before: the copy started with no request TTL and stayed a hit 10 s later.
    """
    pool, clock, state = make_pool(vllm_parts, ttl=None, request_ttls=True)
    _, request = vllm_parts
    owner, _ = run_with_ttl(pool, request(range(8)), None)  # the owner keeps its blocks
    private, hits = run_with_ttl(pool, request(range(8)), 0.0)  # a TTL-0 request hits them
    assert hits == 2
    pool.free_blocks(reversed(private))
    source = owner[1]
    (copy,) = pool.get_new_blocks(1)
    pool.move_block_hashes(source, copy)  # the owner writes on into `source`
    assert copy.block_hash is not None and source.block_hash is None
    pool.free_blocks([copy])  # the prefix cache holds the copy
    clock.now = 10.0
    assert run_with_ttl(pool, request(range(8)), None)[1] == 1  # block 0: still held by the owner
    assert state.expired_by_request == 1


# -- memory: one queue per TTL in use, whatever TTL values clients send ---------------------


def test_distinct_request_ttls_keep_the_queues_bounded(vllm_parts):
    """Before: a queue emptied when its block was reused kept its entry until its first
    deadline (here days away): 2,000 distinct TTLs left 2,000 queues and heap entries."""
    from vllm_nf4kv.ttl.expiry import STALE_HEAP_ENTRIES

    num_blocks = 8
    pool, clock, state = make_pool(vllm_parts, ttl=None, request_ttls=True, num_blocks=num_blocks)
    _, request = vllm_parts
    for i in range(2000):
        blocks, _ = run_with_ttl(pool, request([i] * BLOCK_SIZE), 86_400.0 + i / 8)  # one block each
        pool.free_blocks(blocks)
        clock.now += 0.001
    assert len(state.queues) == len(state.queue_bound) <= num_blocks
    assert len(state.queue_bounds) <= 2 * len(state.queue_bound) + STALE_HEAP_ENTRIES
    assert len(state.released) == len(state.request_ttl) == num_blocks - 1  # the null block aside
    clock.now = 86_400.0 + 2000 / 8 + 10  # every TTL has passed: all of them still expire
    assert pool.nf4kv_sweep() == num_blocks - 1 and not state.queues
