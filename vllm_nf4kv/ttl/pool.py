"""The TTL policy on vLLM's ``BlockPool``: expiry on top of LRU, amortised O(1).

Semantics (docs/ttl.md):

* a block's *last use* is the moment its reference count last dropped to 0
  (the last release; a touch takes the block out of the free queue, and the
  next release is later than that touch);
* a free block holding a prefix-cache hash whose last use is older than the TTL
  (``now - last_use > ttl``) is *expired*: it is never a prefix hit again; it
  loses all its hashes and moves to the front of the free queue, where vLLM
  takes blocks first;
* blocks held by running requests never expire; unexpired blocks keep vLLM's
  LRU order (this module never reorders them); with the TTL off nothing changes.

How it stays O(1) amortised: ``released`` is an insertion-ordered map
(``OrderedDict``, O(1) at both ends and in the middle) of the free cached
blocks keyed by block id, in release order, which is also their LRU order in
vLLM's free queue. Releases append, touches and allocations delete, and a
*sweep* pops expired entries from the oldest end, at most ``sweep_budget`` per
call, at each allocation and release and before stats. Every entry is popped
at most once per release, so the sweeps cost O(1) per operation amortised and
there is never a full scan. Correctness does not wait for sweeps: a lookup that
lands on an expired block expires it on the spot and looks again (lazy check).

The policy is applied to one pool *instance* (the scheduler's) by switching its
class to a subclass of its own class (:func:`enable_ttl`), so pools that vLLM
builds elsewhere (CPU offload, HiSparse host pools) stay vLLM's, and no vLLM
constructor signature is involved (0.33 added ``num_hash_lookahead_tokens``).
With the TTL off the pool only gets :class:`CachedBlockCountMixin` (the cached-block
gauge); its lookup, release and allocation paths stay vLLM's.
``KVCacheBlock`` has ``__slots__``, so the per-block state lives here, by block
id. The clock is injectable and must not go backwards (``time.monotonic``).

This module imports nothing from vLLM: it works on whatever ``BlockPool`` class
the pool has, after :func:`missing_features` has checked what it relies on.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SWEEP_BUDGET = 256  # expired blocks handled per pool operation, at most

# What the policy calls or overrides on vLLM's BlockPool and its free queue.
REQUIRED_POOL_METHODS = (
    "get_cached_block",
    "touch",
    "free_blocks",
    "get_new_blocks",
    "reset_prefix_cache",
    "_insert_block_hash",
    "_remove_cached_block_hashes",
    "_maybe_evict_cached_block",
)
REQUIRED_POOL_ATTRIBUTES = ("blocks", "free_block_queue", "enable_caching")
REQUIRED_QUEUE_METHODS = ("remove", "prepend_n", "get_all_free_blocks")


@dataclass
class TTLState:
    """Per-pool state of the policy (the pool's ``_nf4kv`` attribute)."""

    ttl_s: float | None
    clock: Callable[[], float]
    sweep_budget: int
    # free blocks that hold a hash: block id -> release time, oldest first
    released: OrderedDict[int, float] = field(default_factory=OrderedDict)
    cached_blocks: int = 0  # blocks holding at least one prefix-cache hash
    expired_blocks: int = 0  # blocks dropped from the prefix cache by the TTL, since start

    def is_expired(self, block_id: int, now: float) -> bool:
        if self.ttl_s is None:
            return False
        released_at = self.released.get(block_id)
        return released_at is not None and now - released_at > self.ttl_s


class CachedBlockCountMixin:
    """Counts blocks that hold a prefix-cache hash (for the metrics); nothing else.

    What the scheduler's pool gets with the TTL off: vLLM's lookup, release and
    allocation paths stay exactly vLLM's. Every hash change goes through the
    two methods below (``reset_prefix_cache`` resets all of them at once).
    """

    _nf4kv: TTLState

    def _insert_block_hash(self, block_hash: Any, block: Any, *args: Any, **kwargs: Any) -> None:
        had_hash = block.block_hash is not None
        super()._insert_block_hash(block_hash, block, *args, **kwargs)  # type: ignore[misc]
        if not had_hash and block.block_hash is not None:
            self._nf4kv.cached_blocks += 1

    def _remove_cached_block_hashes(self, block: Any, *args: Any, **kwargs: Any) -> Any:
        had_hash = block.block_hash is not None
        removed = super()._remove_cached_block_hashes(block, *args, **kwargs)  # type: ignore[misc]
        if had_hash and block.block_hash is None:
            self._nf4kv.cached_blocks -= 1
        return removed

    def reset_prefix_cache(self, *args: Any, **kwargs: Any) -> bool:
        done = super().reset_prefix_cache(*args, **kwargs)  # type: ignore[misc]
        if done:
            self._nf4kv.released.clear()
            self._nf4kv.cached_blocks = 0
        return done

    def nf4kv_sweep(self, budget: int | None = None) -> int:
        """Expire what has expired now (up to ``budget`` blocks); returns how many."""
        return 0


class TTLBlockPoolMixin(CachedBlockCountMixin):
    """The TTL policy: overrides of ``BlockPool`` methods, mixed in front of its class.

    Every override calls vLLM's method and adds bookkeeping and expiry around
    it; ``self`` is the vLLM pool and ``self._nf4kv.ttl_s`` is never None here.
    """

    # -- lookups ------------------------------------------------------------

    def get_cached_block(self, block_hash: Any, kv_cache_group_ids: list[int]) -> Any:
        blocks = super().get_cached_block(block_hash, kv_cache_group_ids)  # type: ignore[misc]
        if blocks is None:
            return None
        state = self._nf4kv
        released, ttl_s, now = state.released, state.ttl_s, None
        for block in blocks:
            released_at = released.get(block.block_id)
            if released_at is None:
                continue  # held by a request: never expires
            if now is None:
                now = state.clock()
            if now - released_at > ttl_s:
                break
        else:
            return blocks  # the common case: nothing expired
        while blocks is not None:
            expired = [b for b in blocks if b.ref_cnt == 0 and state.is_expired(b.block_id, now)]
            if not expired:
                return blocks
            # Lazy check: expire, and look again (another block may hold the same hash).
            self._nf4kv_expire(expired)
            blocks = super().get_cached_block(block_hash, kv_cache_group_ids)  # type: ignore[misc]
        return None

    # -- releases and reuse -------------------------------------------------

    def free_blocks(self, ordered_blocks: Iterable[Any], *args: Any, **kwargs: Any) -> None:
        state = self._nf4kv
        blocks = list(ordered_blocks)  # callers pass iterators (reversed(), generators)
        super().free_blocks(blocks, *args, **kwargs)  # type: ignore[misc]
        now = state.clock()
        self._nf4kv_track_released(blocks, now)
        self._nf4kv_sweep(now, state.sweep_budget)

    def unpin_blocks(self, blocks: Iterable[Any], *args: Any, **kwargs: Any) -> None:
        # HiSparse (vLLM 0.32, 0.33): a release to the tail of the free queue.
        blocks = list(blocks)
        super().unpin_blocks(blocks, *args, **kwargs)  # type: ignore[misc]
        self._nf4kv_track_released(blocks, self._nf4kv.clock())

    def touch(self, blocks: Any, *args: Any, **kwargs: Any) -> None:
        blocks = list(blocks)
        super().touch(blocks, *args, **kwargs)  # type: ignore[misc]
        released = self._nf4kv.released
        for block in blocks:
            released.pop(block.block_id, None)

    def get_new_blocks(self, num_blocks: int, *args: Any, **kwargs: Any) -> list[Any]:
        state = self._nf4kv
        now = state.clock()
        self._nf4kv_sweep(now, state.sweep_budget)  # expired blocks to the front first
        blocks = super().get_new_blocks(num_blocks, *args, **kwargs)  # type: ignore[misc]
        released, ttl_s = state.released, state.ttl_s
        for block in blocks:
            released_at = released.pop(block.block_id, None)
            if released_at is not None and now - released_at > ttl_s:
                state.expired_blocks += 1  # expired, reused before a sweep reached it
        return blocks

    def reset_prefix_cache(self, *args: Any, **kwargs: Any) -> bool:
        # Count what had expired before the reset wipes every hash.
        self._nf4kv_sweep(self._nf4kv.clock(), None)
        return super().reset_prefix_cache(*args, **kwargs)

    # -- the policy -----------------------------------------------------------

    def _nf4kv_track_released(self, blocks: list[Any], now: float) -> None:
        released = self._nf4kv.released
        for block in blocks:
            if block.ref_cnt == 0 and block.block_hash is not None and not block.is_null:
                owner = getattr(block, "pool", None)  # deferred frees may hold other pools' blocks
                if owner is None or owner is self:
                    released[block.block_id] = now
                    released.move_to_end(block.block_id)

    def _nf4kv_sweep(self, now: float, budget: int | None) -> int:
        """Expire up to ``budget`` (None: all) expired blocks, oldest first."""
        state = self._nf4kv
        released, ttl_s = state.released, state.ttl_s
        if not released:
            return 0
        blocks = self.blocks  # type: ignore[attr-defined]
        expired = []
        while released and (budget is None or len(expired) < budget):
            block_id, released_at = next(iter(released.items()))
            if now - released_at <= ttl_s:
                break  # release order: everything after this one is younger
            expired.append(blocks[block_id])
            released.popitem(last=False)
        self._nf4kv_expire(expired, already_untracked=True)
        return len(expired)

    def _nf4kv_expire(self, blocks: list[Any], already_untracked: bool = False) -> None:
        """Drop free ``blocks`` from the prefix cache and move them to the queue's front."""
        state = self._nf4kv
        queue = self.free_block_queue  # type: ignore[attr-defined]
        moved = []
        for block in blocks:
            if not already_untracked:
                state.released.pop(block.block_id, None)
            if block.ref_cnt != 0 or block.block_hash is None:
                continue  # taken or dropped meanwhile (e.g. evict_blocks): nothing to expire
            # vLLM's own eviction step: removes every hash, emits BlockRemoved
            # events and closes the block's --kv-cache-metrics residency sample.
            if self._maybe_evict_cached_block(block):  # type: ignore[attr-defined]
                state.expired_blocks += 1
            queue.remove(block)
            moved.append(block)
        queue.prepend_n(moved)

    def nf4kv_sweep(self, budget: int | None = None) -> int:
        return self._nf4kv_sweep(self._nf4kv.clock(), budget)


_POOL_CLASSES: dict[tuple[type, bool], type] = {}


def vllm_pool_class(cls: type) -> type:
    """The vLLM class under one of ours (``cls`` itself when it is not ours)."""
    return getattr(cls, "_nf4kv_base", cls)


def ttl_pool_class(base: type, policy: bool = True) -> type:
    """Our subclass of a ``BlockPool`` class: with the TTL policy, or counting only."""
    base = vllm_pool_class(base)
    key = (base, policy)
    cls = _POOL_CLASSES.get(key)
    if cls is None:
        mixin = TTLBlockPoolMixin if policy else CachedBlockCountMixin
        what = "the prefix-cache TTL" if policy else "a cached-block count"
        namespace = {
            "__module__": __name__,
            "__doc__": f"{base.__qualname__} with {what} (vllm-nf4kv).",
            "_nf4kv_base": base,
        }
        cls = type(f"{'TTL' if policy else 'Counted'}{base.__name__}", (mixin, base), namespace)
        _POOL_CLASSES[key] = cls
    return cls


def missing_features(pool: Any) -> list[str]:
    """What this policy needs and ``pool`` lacks (empty when it can be enabled)."""
    missing = [name for name in REQUIRED_POOL_METHODS if not callable(getattr(pool, name, None))]
    missing += [name for name in REQUIRED_POOL_ATTRIBUTES if not hasattr(pool, name)]
    queue = getattr(pool, "free_block_queue", None)
    missing += [
        f"free_block_queue.{name}"
        for name in REQUIRED_QUEUE_METHODS
        if not callable(getattr(queue, name, None))
    ]
    return missing


def enable_ttl(
    pool: Any,
    ttl_s: float | None,
    *,
    clock: Callable[[], float] = time.monotonic,
    sweep_budget: int = DEFAULT_SWEEP_BUDGET,
) -> TTLState:
    """Put the policy on one vLLM ``BlockPool`` instance, in place; returns its state.

    ``ttl_s`` None keeps vLLM's behaviour and only counts cached blocks (for
    the metrics). Safe on a pool in use: free cached blocks count as released
    now. Calling it again replaces the TTL, clock and budget, keeping counters.
    """
    missing = missing_features(pool)
    if missing:
        raise RuntimeError(
            f"vllm-nf4kv prefix-cache TTL: this vLLM's {type(pool).__qualname__} lacks "
            f"{', '.join(missing)}; the TTL policy cannot run on it"
        )
    if ttl_s is not None and (ttl_s != ttl_s or ttl_s < 0):
        raise ValueError(f"ttl_s must be None or >= 0 seconds, got {ttl_s!r}")
    if sweep_budget < 1:
        raise ValueError(f"sweep_budget must be >= 1, got {sweep_budget}")
    if ttl_s is not None and not pool.enable_caching:
        ttl_s = None  # no prefix cache, nothing to expire
    previous: TTLState | None = getattr(pool, "_nf4kv", None)
    now = clock()
    state = TTLState(ttl_s=ttl_s, clock=clock, sweep_budget=sweep_budget)
    if previous is not None:
        state.cached_blocks = previous.cached_blocks
        state.expired_blocks = previous.expired_blocks
    else:
        state.cached_blocks = sum(1 for block in pool.blocks if block.block_hash is not None)
    if ttl_s is not None:
        for block in pool.free_block_queue.get_all_free_blocks():  # queue order = LRU order
            if block.block_hash is not None:
                state.released[block.block_id] = (
                    previous.released.get(block.block_id, now) if previous is not None else now
                )
    cls = ttl_pool_class(type(pool), policy=ttl_s is not None)
    try:
        pool.__class__ = cls
    except TypeError as exc:  # e.g. a pool class with __slots__
        raise RuntimeError(
            f"vllm-nf4kv prefix-cache TTL cannot extend {type(pool).__qualname__}: {exc}"
        ) from exc
    pool._nf4kv = state
    return state


def ttl_state(pool: Any) -> TTLState | None:
    """The policy's state on ``pool``, or None where :func:`enable_ttl` never ran."""
    return getattr(pool, "_nf4kv", None) if isinstance(pool, CachedBlockCountMixin) else None
