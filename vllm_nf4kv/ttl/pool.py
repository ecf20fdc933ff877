"""The TTL policy on vLLM's ``BlockPool``: expiry on top of LRU, amortised O(1).

Semantics (docs/ttl.md):

* a block's *last use* is the moment its reference count last dropped to 0
  (the last release; a touch takes the block out of the free queue, and the
  next release is later than that touch);
* a block's TTL is the tightest of the server-wide TTL and the *request TTLs*
  of every request that used its current content (allocated it or hit it):
  privacy wins, a longer TTL never loosens a shorter one; a block that gets new
  content (reused, or its hash dropped while free) starts with no request TTL,
  while content that stays or moves keeps them (a held block's partial hash
  promoted to a full one; vLLM's ``move_block_hashes`` to a private copy);
* a free block holding a prefix-cache hash whose last use is older than its
  TTL (``now > last_use + ttl``) is *expired*: it is never a prefix hit again;
  it loses all its hashes and moves to the front of the free queue, where vLLM
  takes blocks first;
* blocks held by running requests never expire; unexpired blocks keep vLLM's
  LRU order (this module never reorders them); with no TTL nothing changes.

How it stays O(1) amortised: :mod:`vllm_nf4kv.ttl.expiry` (the queues and the sweep).

The policy is applied to one pool *instance* (the scheduler's) by switching its
class to a subclass of its own class (:func:`enable_ttl`), so pools that vLLM
builds elsewhere (CPU offload, HiSparse host pools) stay vLLM's, and no vLLM
constructor signature is involved (0.33 added ``num_hash_lookahead_tokens``).
With no TTL the pool only gets :class:`CachedBlockCountMixin` (the cached-block
gauge); its lookup, release and allocation paths stay vLLM's. Request TTLs
reach the pool through :func:`request_ttl_scope`, which the scheduler's KV-cache
manager opens around each allocation (``vllm_nf4kv.ttl.engine``).
``KVCacheBlock`` has ``__slots__``, so the per-block state lives here, by block
id. The clock is injectable and must not go backwards (``time.monotonic``).

This module imports nothing from vLLM: it works on whatever ``BlockPool`` class
the pool has, after :func:`missing_features` has checked what it relies on.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from vllm_nf4kv.ttl.expiry import TTLState

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


@contextlib.contextmanager
def request_ttl_scope(pool: Any, ttl_s: float | None) -> Iterator[None]:
    """Blocks the pool hands out or touches inside the scope get request TTL ``ttl_s``.

    What vLLM's KV-cache manager does for one request (``allocate_slots``:
    hits touched, new blocks taken) runs inside it; ``None`` is a no-op.
    """
    state = ttl_state(pool)
    if ttl_s is None or state is None or not state.request_ttls:
        yield
        return
    previous, state.scope_ttl = state.scope_ttl, ttl_s
    try:
        yield
    finally:
        state.scope_ttl = previous


class CachedBlockCountMixin:
    """Counts blocks that hold a prefix-cache hash (for the metrics); nothing else.

    What the scheduler's pool gets with no TTL: vLLM's lookup, release and
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
            self._nf4kv.clear()
        return done

    def nf4kv_sweep(self, budget: int | None = None) -> int:
        """Expire what has expired now (up to ``budget`` blocks); returns how many."""
        return 0


class TTLBlockPoolMixin(CachedBlockCountMixin):
    """The TTL policy: overrides of ``BlockPool`` methods, mixed in front of its class.

    Every override calls vLLM's method and adds bookkeeping and expiry around
    it; ``self`` is the vLLM pool and ``self._nf4kv.policy`` is true here.
    """

    # -- lookups ------------------------------------------------------------

    def get_cached_block(self, block_hash: Any, kv_cache_group_ids: list[int]) -> Any:
        blocks = super().get_cached_block(block_hash, kv_cache_group_ids)  # type: ignore[misc]
        if blocks is None:
            return None
        state = self._nf4kv
        released, now = state.released, None
        for block in blocks:
            if block.block_id not in released:
                continue  # held by a request, or no TTL: never expires
            if now is None:
                now = state.clock()
            if state.is_expired(block.block_id, now):
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

    def _remove_cached_block_hashes(self, block: Any, *args: Any, **kwargs: Any) -> Any:
        if block.block_hash is None:  # nothing cached (vLLM asks for every block it hands out)
            return super()._remove_cached_block_hashes(block, *args, **kwargs)  # type: ignore[misc]
        state = self._nf4kv
        block_id = block.block_id
        if block_id in state.released and state.is_expired(block_id, state.clock()):
            state.count_expired(state.by_request(block_id))  # e.g. reused before a sweep reached it
        removed = super()._remove_cached_block_hashes(block, *args, **kwargs)  # type: ignore[misc]
        if block.block_hash is None:
            if block.ref_cnt == 0:
                state.forget_content(block_id)  # evicted: its content is no prefix any more
            else:
                # Held: its content stays with the request writing it (a partial block promoted
                # to full, the source of a move), and so do the TTLs of the requests that used it.
                state.untrack(block_id)
        return removed

    def move_block_hashes(self, src_block: Any, dst_block: Any, *args: Any, **kwargs: Any) -> None:
        # vLLM (Mamba align mode): the cache entry moves to a private copy, and so does every
        # request TTL that applied to the content (the copy also keeps its own allocation's).
        ttl = self._nf4kv.request_ttl.get(src_block.block_id)
        super().move_block_hashes(src_block, dst_block, *args, **kwargs)  # type: ignore[misc]
        if ttl is not None:
            self._nf4kv.use(dst_block.block_id, ttl)

    # -- releases and reuse -------------------------------------------------

    def free_blocks(self, ordered_blocks: Iterable[Any], *args: Any, **kwargs: Any) -> None:
        state = self._nf4kv
        blocks = list(ordered_blocks)  # callers pass iterators (reversed(), generators)
        super().free_blocks(blocks, *args, **kwargs)  # type: ignore[misc]
        now = state.clock()
        self._nf4kv_track_released(blocks, now)
        self._nf4kv_sweep(now, state.sweep_budget)

    def unpin_blocks(self, blocks: Iterable[Any], *args: Any, **kwargs: Any) -> None:
        # HiSparse (vLLM 0.32 to 0.34): a release to the tail of the free queue.
        blocks = list(blocks)
        super().unpin_blocks(blocks, *args, **kwargs)  # type: ignore[misc]
        self._nf4kv_track_released(blocks, self._nf4kv.clock())

    def touch(self, blocks: Any, *args: Any, **kwargs: Any) -> None:
        blocks = list(blocks)
        super().touch(blocks, *args, **kwargs)  # type: ignore[misc]
        state = self._nf4kv
        released, scope_ttl = state.released, state.scope_ttl
        for block in blocks:
            if block.block_id in released:
                state.untrack(block.block_id)
        if scope_ttl is not None:
            for block in blocks:
                if not block.is_null:
                    state.use(block.block_id, scope_ttl)

    def get_new_blocks(self, num_blocks: int, *args: Any, **kwargs: Any) -> list[Any]:
        state = self._nf4kv
        now = state.clock()
        # Expired blocks to the front first, at least as many as this allocation takes.
        self._nf4kv_sweep(now, max(state.sweep_budget, num_blocks))
        blocks = super().get_new_blocks(num_blocks, *args, **kwargs)  # type: ignore[misc]
        # vLLM's eviction above forgot the blocks that had a hash; these get new content.
        request_ttl = state.request_ttl
        for block in blocks:
            request_ttl.pop(block.block_id, None)
        if state.scope_ttl is not None:
            for block in blocks:
                request_ttl[block.block_id] = state.scope_ttl
        return blocks

    def reset_prefix_cache(self, *args: Any, **kwargs: Any) -> bool:
        # Count what had expired before the reset wipes every hash.
        self._nf4kv_sweep(self._nf4kv.clock(), None)
        return super().reset_prefix_cache(*args, **kwargs)

    # -- the policy -----------------------------------------------------------

    def _nf4kv_track_released(self, blocks: list[Any], now: float) -> None:
        state = self._nf4kv
        for block in blocks:
            if block.ref_cnt == 0 and block.block_hash is not None and not block.is_null:
                if owned_by(block, self):  # deferred frees may hold other pools' blocks
                    state.track(block.block_id, now)

    def _nf4kv_sweep(self, now: float, budget: int | None) -> int:
        """Expire up to ``budget`` (None: all) expired blocks, earliest deadline first."""
        expired_ids = self._nf4kv.pop_expired(now, budget)
        if expired_ids:
            blocks = self.blocks  # type: ignore[attr-defined]
            self._nf4kv_expire([blocks[block_id] for block_id in expired_ids])
        return len(expired_ids)

    def _nf4kv_expire(self, blocks: list[Any]) -> None:
        """Drop free ``blocks`` from the prefix cache and move them to the queue's front."""
        state = self._nf4kv
        queue = self.free_block_queue  # type: ignore[attr-defined]
        moved = []
        for block in blocks:
            state.untrack(block.block_id)
            if block.ref_cnt != 0 or block.block_hash is None:
                continue  # taken or dropped meanwhile (e.g. evict_blocks): nothing to expire
            by_request = state.by_request(block.block_id)  # before the eviction forgets its TTL
            # vLLM's own eviction step: removes every hash, emits BlockRemoved
            # events and closes the block's --kv-cache-metrics residency sample.
            if self._maybe_evict_cached_block(block):  # type: ignore[attr-defined]
                state.count_expired(by_request)
            queue.remove(block)
            moved.append(block)
        queue.prepend_n(moved)

    def nf4kv_sweep(self, budget: int | None = None) -> int:
        return self._nf4kv_sweep(self._nf4kv.clock(), budget)


def owned_by(block: Any, pool: Any) -> bool:
    """Whether ``block`` is one of ``pool``'s own blocks.

    ``KVCacheBlock.pool`` names the pool a block came from, for frees that mix
    pools: the pool itself in vLLM 0.32 and 0.33, a ``weakref.ref`` to it in 0.34,
    None where the block was built without one (always the pool's own).
    """
    owner = getattr(block, "pool", None)
    if owner is None:
        return True
    if isinstance(owner, weakref.ReferenceType):
        owner = owner()  # None once that pool is gone: not this one
    return owner is pool


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
    request_ttls: bool = False,
    clock: Callable[[], float] = time.monotonic,
    sweep_budget: int = DEFAULT_SWEEP_BUDGET,
) -> TTLState:
    """Put the policy on one vLLM ``BlockPool`` instance, in place; returns its state.

    ``ttl_s`` is the server-wide TTL; ``request_ttls`` honours the TTLs that
    :func:`request_ttl_scope` passes. With neither, vLLM's behaviour stays and
    the pool only counts cached blocks (for the metrics). Safe on a pool in use:
    free cached blocks count as released now. Calling it again replaces the
    TTL, clock and budget, keeping counters, release times and request TTLs.
    """
    missing = missing_features(pool)
    if missing:
        raise RuntimeError(
            f"vllm-nf4kv prefix-cache TTL: this vLLM's {type(pool).__qualname__} lacks "
            f"{', '.join(missing)}; the TTL policy cannot run on it"
        )
    if ttl_s is not None and (math.isnan(ttl_s) or ttl_s < 0):
        raise ValueError(f"ttl_s must be None or >= 0 seconds, got {ttl_s!r}")
    if sweep_budget < 1:
        raise ValueError(f"sweep_budget must be >= 1, got {sweep_budget}")
    if not pool.enable_caching:
        ttl_s, request_ttls = None, False  # no prefix cache, nothing to expire
    previous: TTLState | None = getattr(pool, "_nf4kv", None)
    now = clock()
    state = TTLState(ttl_s=ttl_s, clock=clock, sweep_budget=sweep_budget, request_ttls=request_ttls)
    if previous is not None:
        state.cached_blocks = previous.cached_blocks
        state.expired_by_server = previous.expired_by_server
        state.expired_by_request = previous.expired_by_request
        if request_ttls:
            state.request_ttl = dict(previous.request_ttl)
    else:
        state.cached_blocks = sum(1 for block in pool.blocks if block.block_hash is not None)
    if state.policy:
        released = previous.released if previous is not None else {}
        free_cached = [
            (released[block.block_id][0] if block.block_id in released else now, block.block_id)
            for block in pool.free_block_queue.get_all_free_blocks()
            if block.block_hash is not None
        ]
        for released_at, block_id in sorted(free_cached):  # each TTL's queue in release order
            state.track(block_id, released_at)
    cls = ttl_pool_class(type(pool), policy=state.policy)
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
