"""The expiry bookkeeping of one TTL pool: which free cached blocks expire when, in O(1) amortised.

Why a module of its own: this is the data structure (queues, heap, counters) and nothing
else; :mod:`vllm_nf4kv.ttl.pool` applies it to vLLM's ``BlockPool`` (when a block is
released, touched, reused or looked up). It imports nothing from vLLM.

How it stays O(1) amortised: the free cached blocks that have a TTL sit in one
insertion-ordered map per distinct TTL (``OrderedDict``, O(1) at both ends and
in the middle), in release order, so each map's deadlines only grow. A heap
holds one entry per map, a lower bound of its first deadline. Releases append,
touches and allocations delete, and a *sweep* pops expired blocks from the
heads of the maps whose bound has passed, at most ``sweep_budget`` per call (at
least as many as an allocation takes), at each allocation and release and
before stats. Every block is popped at most once per release, so sweeps cost
O(1) per operation amortised plus O(log T) per map visited, T being the number
of distinct TTLs in use (one for a server-wide TTL alone); there is never a
full scan. A map that empties is dropped (its heap entry goes stale, and stale
entries are rebuilt away in bulk), so T and the heap stay O(free cached blocks)
whatever TTL values clients send. Correctness does not wait for sweeps: a lookup
that lands on an expired block expires it on the spot and looks again (lazy check).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

# Heap entries of dropped queues tolerated (beyond one per live queue) before the heap is
# rebuilt: memory stays O(free cached blocks) whatever TTL values clients send, and the
# O(T) rebuild runs at most once per T + this many drops.
STALE_HEAP_ENTRIES = 64


@dataclass
class TTLState:
    """Per-pool state of the policy (the pool's ``_nf4kv`` attribute)."""

    ttl_s: float | None  # the server-wide TTL; None: none
    clock: Callable[[], float]
    sweep_budget: int
    request_ttls: bool = False  # honour request TTLs (the policy runs even without ttl_s)
    # free blocks that hold a hash and have a TTL: block id -> (release time, TTL)
    released: dict[int, tuple[float, float]] = field(default_factory=dict)
    # the same blocks by TTL, oldest release first: TTL -> {block id: deadline}
    queues: dict[float, OrderedDict[int, float]] = field(default_factory=dict)
    # a heap of (a lower bound of its first deadline, TTL): one entry per queue, plus at most
    # 2 x queues + STALE_HEAP_ENTRIES stale ones of queues dropped since (skipped when popped)
    queue_bounds: list[tuple[float, float]] = field(default_factory=list)
    queue_bound: dict[float, float] = field(default_factory=dict)  # TTL -> its entry's bound
    # block id -> the tightest request TTL among the requests that used its content
    request_ttl: dict[int, float] = field(default_factory=dict)
    scope_ttl: float | None = None  # the request TTL of the allocation in progress
    cached_blocks: int = 0  # blocks holding at least one prefix-cache hash
    expired_by_server: int = 0  # blocks dropped by the server-wide TTL, since start
    expired_by_request: int = 0  # blocks dropped by a request TTL, since start

    @property
    def policy(self) -> bool:
        """Whether any TTL can apply (else the pool only counts cached blocks)."""
        return self.ttl_s is not None or self.request_ttls

    @property
    def expired_blocks(self) -> int:
        return self.expired_by_server + self.expired_by_request

    def block_ttl(self, block_id: int) -> float | None:
        """The TTL of a block's current content: the tightest bound, None for none."""
        ttl = self.request_ttl.get(block_id)
        if self.ttl_s is not None and (ttl is None or self.ttl_s < ttl):
            return self.ttl_s
        return ttl

    def by_request(self, block_id: int) -> bool:
        """Whether a request TTL, not the server-wide one, sets the block's TTL."""
        return self.block_ttl(block_id) != self.ttl_s  # the server's wins a tie

    def count_expired(self, by_request: bool) -> None:
        """Count one expiry, by the TTL that set it (the server's when both agree)."""
        if by_request:
            self.expired_by_request += 1
        else:
            self.expired_by_server += 1

    def is_expired(self, block_id: int, now: float) -> bool:
        entry = self.released.get(block_id)
        return entry is not None and now > entry[0] + entry[1]

    def track(self, block_id: int, now: float) -> None:
        """A free cached block released at ``now``: it expires after its TTL, if any."""
        if block_id in self.released:
            self.untrack(block_id)
        ttl = self.block_ttl(block_id)
        if ttl is None:
            return
        self.released[block_id] = (now, ttl)
        deadline = now + ttl
        queue = self.queues.get(ttl)
        if queue is None:
            queue = self.queues[ttl] = OrderedDict()
        if ttl not in self.queue_bound:
            self.queue_bound[ttl] = deadline
            heapq.heappush(self.queue_bounds, (deadline, ttl))
        queue[block_id] = deadline

    def untrack(self, block_id: int) -> None:
        """The block is taken, re-released or dropped: no pending expiry."""
        entry = self.released.pop(block_id, None)
        if entry is None:
            return
        ttl = entry[1]
        queue = self.queues[ttl]
        del queue[block_id]
        if not queue:  # one queue per TTL in use, never more: distinct request TTLs come and go
            del self.queues[ttl], self.queue_bound[ttl]  # its heap entry is stale now
            self.compact_heap()

    def compact_heap(self) -> None:
        """Rebuild the heap once stale entries outnumber the live ones (plus a slack)."""
        if len(self.queue_bounds) > 2 * len(self.queue_bound) + STALE_HEAP_ENTRIES:
            self.queue_bounds[:] = [(bound, ttl) for ttl, bound in self.queue_bound.items()]
            heapq.heapify(self.queue_bounds)

    def use(self, block_id: int, ttl: float) -> None:
        """A request with TTL ``ttl`` uses the block's content: the tightest bound wins."""
        current = self.request_ttl.get(block_id)
        if current is None or ttl < current:
            self.request_ttl[block_id] = ttl

    def pop_expired(self, now: float, budget: int | None) -> list[int]:
        """Untrack and return up to ``budget`` (None: all) expired blocks, earliest first."""
        expired: list[int] = []
        bounds = self.queue_bounds
        while bounds and (budget is None or len(expired) < budget):
            bound, ttl = bounds[0]
            if not now > bound:
                break  # every queue's first deadline is at least its bound
            heapq.heappop(bounds)
            if self.queue_bound.get(ttl) != bound:
                continue  # a stale entry
            queue = self.queues[ttl]
            while queue and (budget is None or len(expired) < budget):
                block_id, deadline = next(iter(queue.items()))
                if not now > deadline:
                    break  # release order: everything after this one is younger
                queue.popitem(last=False)
                del self.released[block_id]
                expired.append(block_id)
            if queue:
                bound = next(iter(queue.values()))
                self.queue_bound[ttl] = bound
                heapq.heappush(bounds, (bound, ttl))
            else:
                del self.queues[ttl], self.queue_bound[ttl]
        self.compact_heap()  # fewer live queues: the bound on stale entries shrinks too
        return expired

    def forget_content(self, block_id: int) -> None:
        """The block lost its hash or gets new content: its TTL state goes with it."""
        self.untrack(block_id)
        self.request_ttl.pop(block_id, None)

    def clear(self) -> None:
        """The prefix cache was reset: no block holds content any more."""
        self.released.clear()
        self.queues.clear()
        self.queue_bounds.clear()
        self.queue_bound.clear()
        self.request_ttl.clear()
        self.cached_blocks = 0
