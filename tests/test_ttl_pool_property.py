"""Model-based property test: vLLM's real ``BlockPool`` with the TTL policy vs a reference.

Hypothesis drives random sequences of allocate (prefix lookup, touch of the
hits, new blocks, caching, inside :func:`~vllm_nf4kv.ttl.pool.request_ttl_scope`
with a drawn request TTL, as the scheduler's KV-cache manager does), free,
lookup, reset and clock advances through the real vLLM ``BlockPool`` (with real
``Request`` objects and vLLM's block hasher), with the policy enabled by
:func:`vllm_nf4kv.ttl.pool.enable_ttl` (a drawn server-wide TTL, request TTLs
on or off) and an injected clock. A small reference model says which blocks
are *live* (held by a request, or free with a hash and released at most their
TTL ago, the TTL being the tightest of the server's and those of every request
that used the block's content) and in which LRU order free live blocks must be
reused. Checked after every step:

* no TTL violation: a lookup never returns a free block released more than its
  TTL ago; and no spurious expiry: it finds every live block;
* blocks held by requests never expire, however long they are held;
* allocation takes expired and uncached blocks first, then the least recently
  used live ones, in the reference's order; live blocks in vLLM's free queue
  keep LRU order;
* the cached-block count and the expired-block counts by cause (server TTL,
  request TTL) match the reference.

The sweep budget is drawn too (1 forces lazy expiry on lookups and at reuse).
"""

from __future__ import annotations

import math

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

BLOCK_SIZE = 2  # tokens per block: small, so random prompts share prefixes
TOKENS = st.lists(st.integers(0, 1), min_size=1, max_size=7)
TTLS = [None, 0.0, 1.0, 2.5, 6.0]


def _vllm():
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK_SIZE, sha256)

    def make_request(request_id: str, tokens: list[int]) -> Request:
        return Request(request_id, tokens, SamplingParams(max_tokens=1), None, block_hasher=hasher)

    return BlockPool, make_request


class TTLPoolMachine(RuleBasedStateMachine):
    """Real pool + reference model; one instance per Hypothesis example."""

    @initialize(
        num_blocks=st.integers(4, 14),
        ttl=st.sampled_from(TTLS),
        request_ttls=st.booleans(),
        budget=st.sampled_from([1, 2, 256]),
    )
    def setup(self, num_blocks: int, ttl: float | None, request_ttls: bool, budget: int) -> None:
        from vllm_nf4kv.ttl.pool import enable_ttl

        block_pool_cls, self.make_request = _vllm()
        self.now = 0.0
        self.pool = block_pool_cls(num_gpu_blocks=num_blocks, enable_caching=True, hash_block_size=BLOCK_SIZE)
        self.state = enable_ttl(
            self.pool, ttl, request_ttls=request_ttls, clock=lambda: self.now, sweep_budget=budget
        )
        self.ttl = math.inf if ttl is None else ttl
        self.request_ttls = request_ttls
        # reference model (block ids; the null block 0 is never free or cached)
        self.ref = dict.fromkeys(range(1, num_blocks), 0)
        self.hash: dict[int, bytes | None] = dict.fromkeys(range(1, num_blocks))
        # the tightest request TTL among the requests that used a block's content
        self.request_ttl = dict.fromkeys(range(1, num_blocks), math.inf)
        self.released_at: dict[int, float] = {}
        self.lru: list[int] = []  # free blocks with a hash, oldest release first
        self.expired_ended = {False: 0, True: 0}  # expiries already ended (reused, reset), by request?
        self.running: list[list] = []  # blocks of running requests, in order
        self.next_id = 0

    # -- the reference --------------------------------------------------------

    def block_ttl(self, block_id: int) -> float:
        return min(self.ttl, self.request_ttl[block_id])

    def by_request(self, block_id: int) -> bool:
        return self.request_ttl[block_id] < self.ttl

    def expired(self, block_id: int) -> bool:
        return self.now > self.released_at[block_id] + self.block_ttl(block_id)

    def live(self, block_id: int) -> bool:
        if self.hash[block_id] is None:
            return False
        return self.ref[block_id] > 0 or not self.expired(block_id)

    def live_lru(self) -> list[int]:
        return [b for b in self.lru if not self.expired(b)]

    def free_ids(self) -> set[int]:
        return {b for b, n in self.ref.items() if n == 0}

    def check_lookup(self, block_hash: bytes, found) -> None:
        live_holders = {b for b in self.ref if self.hash[b] == block_hash and self.live(b)}
        if found is None:
            assert not live_holders, f"live blocks {live_holders} missed (spurious expiry)"
            return
        (block,) = found
        assert block.block_id in live_holders, (
            f"TTL violation: hit on block {block.block_id} "
            f"(ref {self.ref[block.block_id]}, released at {self.released_at.get(block.block_id)}, "
            f"now {self.now}, ttl {self.block_ttl(block.block_id)})"
        )

    def lookup_chain(self, request) -> list:
        hits = []
        for block_hash in request.block_hashes:
            found = self.pool.get_cached_block(block_hash, [0])
            self.check_lookup(block_hash, found)
            if found is None:
                break
            hits.append(found[0])
        return hits

    # -- rules ----------------------------------------------------------------

    @rule(tokens=TOKENS, request_ttl=st.sampled_from(TTLS))
    def allocate(self, tokens: list[int], request_ttl: float | None) -> None:
        from vllm_nf4kv.ttl.pool import request_ttl_scope

        request = self.make_request(f"r{self.next_id}", tokens)
        self.next_id += 1
        hits = self.lookup_chain(request)
        num_needed = -(-len(tokens) // BLOCK_SIZE)
        num_new = num_needed - len(hits)
        free_after_touch = self.pool.get_num_free_blocks() - sum(1 for b in hits if b.ref_cnt == 0)
        if num_new > free_after_touch:
            return  # does not fit: vLLM would not schedule it
        used_ttl = math.inf if request_ttl is None or not self.request_ttls else request_ttl
        with request_ttl_scope(self.pool, request_ttl):
            self.pool.touch(hits)
            for block in hits:
                if self.ref[block.block_id] == 0:
                    self.lru.remove(block.block_id)
                self.ref[block.block_id] += 1
                self.request_ttl[block.block_id] = min(self.request_ttl[block.block_id], used_ttl)
            dead = {b for b in self.free_ids() if self.hash[b] is None or self.expired(b)}
            live_order = self.live_lru()
            new = self.pool.get_new_blocks(num_new)
        new_ids = [b.block_id for b in new]
        if num_new <= len(dead):
            assert set(new_ids) <= dead, f"reused live blocks {set(new_ids) - dead} before dead {dead}"
        else:
            assert set(new_ids[: len(dead)]) == dead, (new_ids, dead)
            assert new_ids[len(dead) :] == live_order[: num_new - len(dead)], "LRU order broken"
        for block_id in new_ids:
            if self.hash[block_id] is not None:
                if self.expired(block_id):
                    self.expired_ended[self.by_request(block_id)] += 1
                if block_id in self.lru:
                    self.lru.remove(block_id)
            self.hash[block_id] = None
            self.ref[block_id] = 1
            self.request_ttl[block_id] = used_ttl  # new content

        blocks = hits + new
        num_full = len(request.block_hashes)
        self.pool.cache_full_blocks(request, blocks, len(hits), num_full, BLOCK_SIZE, 0)
        for index in range(len(hits), num_full):
            self.hash[blocks[index].block_id] = request.block_hashes[index]
        self.running.append(blocks)

    @rule(data=st.data())
    def free(self, data) -> None:
        if not self.running:
            return
        blocks = self.running.pop(data.draw(st.integers(0, len(self.running) - 1)))
        self.pool.free_blocks(reversed(blocks))  # an iterator, as vLLM's managers pass
        for block in reversed(blocks):
            block_id = block.block_id
            self.ref[block_id] -= 1
            if self.ref[block_id] == 0:
                self.released_at[block_id] = self.now
                if self.hash[block_id] is not None:
                    self.lru.append(block_id)

    @rule(tokens=TOKENS)
    def lookup(self, tokens: list[int]) -> None:
        self.lookup_chain(self.make_request(f"q{self.next_id}", tokens))
        self.next_id += 1

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.5, 7.0]))
    def advance_clock(self, dt: float) -> None:
        self.now += dt

    @rule()
    def reset_prefix_cache(self) -> None:
        done = self.pool.reset_prefix_cache()
        assert done == (not self.running)
        if done:
            for block_id in self.lru:
                if self.expired(block_id):
                    self.expired_ended[self.by_request(block_id)] += 1
            self.lru.clear()
            self.hash = dict.fromkeys(self.hash)
            self.request_ttl = dict.fromkeys(self.request_ttl, math.inf)

    # -- invariants -------------------------------------------------------------

    @invariant()
    def free_queue_keeps_live_blocks_in_lru_order(self) -> None:
        queue = [b.block_id for b in self.pool.free_block_queue.get_all_free_blocks()]
        assert set(queue) == self.free_ids()
        assert self.pool.get_num_free_blocks() == len(queue)
        live = [b for b in queue if self.live(b)]
        assert live == self.live_lru(), "live blocks out of LRU order"
        if self.request_ttl_used() == set() or not self.request_ttls:
            # One TTL for every block: expired blocks are the oldest, never behind a live one.
            first_live = len(queue) - len(live)
            assert queue[first_live:] == live, "a dead block sits behind a live one"

    def request_ttl_used(self) -> set[float]:
        return {ttl for ttl in self.request_ttl.values() if ttl < self.ttl}

    @invariant()
    def counts_match(self) -> None:
        cached = sum(1 for b in self.pool.blocks if b.block_hash is not None)
        assert self.state.cached_blocks == cached
        pending = {False: 0, True: 0}
        for block_id in self.state.released:
            if self.state.is_expired(block_id, self.now):
                pending[self.by_request(block_id)] += 1
        expected = dict(self.expired_ended)
        for block_id in self.lru:
            if self.expired(block_id):
                expected[self.by_request(block_id)] += 1
        assert self.state.expired_by_server + pending[False] == expected[False]
        assert self.state.expired_by_request + pending[True] == expected[True]

    @invariant()
    def one_queue_and_heap_entry_per_ttl_in_use(self) -> None:
        from collections import Counter

        from vllm_nf4kv.ttl.expiry import STALE_HEAP_ENTRIES

        state = self.state
        assert set(state.queues) == set(state.queue_bound)
        live = Counter((b, t) for t, b in state.queue_bound.items())
        assert not live - Counter(state.queue_bounds)  # every queue's bound is in the heap
        assert len(state.queue_bounds) <= 2 * len(live) + STALE_HEAP_ENTRIES  # stale ones, bounded
        for ttl, queue in state.queues.items():
            assert queue  # a queue that empties is dropped
            assert state.queue_bound[ttl] <= next(iter(queue.values()))

    @invariant()
    def held_blocks_never_expire(self) -> None:
        for blocks in self.running:
            for block in blocks:
                assert block.ref_cnt > 0
                if self.hash[block.block_id] is not None:
                    assert block.block_hash is not None, "a held block lost its hash"


TTLPoolMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_ttl_block_pool_matches_reference = TTLPoolMachine.TestCase
