"""Each feature proves itself by doing its job once, on the real vLLM classes, before it is installed.

Why: a check for attributes can pass while the feature does nothing. vLLM 0.34
made ``KVCacheBlock.pool`` a ``weakref.ref``; every method the TTL policy needs
was still there, and a server with a TTL kept every prefix forever. So at
registration (``plugin.register``) each feature runs a few steps on a tiny
in-memory instance of the vLLM classes it changes, with a fake clock where time
matters, and compares what happened with what must happen:

* :func:`check_ttl_pool` (the prefix-cache TTL): a 6-block ``BlockPool`` built
  through the name vLLM's KV-cache coordinator uses gets the policy; two cached
  blocks are released and must be tracked, hit within the TTL, missed and moved
  to the front of the free queue after it; a block cached under a shorter
  request TTL must expire by that TTL.
* :func:`check_nf4_dtype` (``--kv-cache-dtype nf4``): vLLM's ``CacheConfig``
  accepts ``nf4``, the platform's selector answers the nf4 backend for an nf4
  layer, and vLLM's own ``FullAttentionSpec`` sizes pages by the NF4 cell.

A failed step raises :class:`SelfCheckError`, naming the vLLM version and the
step; ``plugin.register`` then refuses the feature (undoes it, logs one error),
and the reason stays in :func:`failure` so that a setting which needs the
feature stops startup with it (``ttl.engine.check_config``), never a server that
silently ignores its TTL. Cost: a few milliseconds per process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

TTL_FEATURE = "the prefix-cache TTL"
NF4_FEATURE = "--kv-cache-dtype nf4"

_FAILURES: dict[str, str] = {}  # feature -> why its self-check failed, in this process


class SelfCheckError(RuntimeError):
    """A feature did not do its job on this vLLM's classes."""

    def __init__(self, feature: str, step: str, detail: str) -> None:
        self.feature, self.step, self.detail = feature, step, detail
        super().__init__(
            f"self-check of {feature} failed on vLLM {vllm_version()} at step '{step}': {detail}"
        )


def vllm_version() -> str:
    try:
        import vllm

        return str(getattr(vllm, "__version__", "unknown"))
    except Exception:  # noqa: BLE001 (a message helper: never fail over it)
        return "unknown"


def failure(feature: str) -> str | None:
    """Why ``feature``'s self-check failed in this process, None where it passed or never ran."""
    return _FAILURES.get(feature)


class _Steps:
    """Names each step of one feature's check; any failure becomes a SelfCheckError."""

    def __init__(self, feature: str) -> None:
        self.feature = feature

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        try:
            yield
        except SelfCheckError:
            raise
        except Exception as error:  # noqa: BLE001 (reported with the step it happened in)
            raise self.failed(name, f"{type(error).__name__}: {error}") from error

    def expect(self, name: str, condition: bool, detail: str) -> None:
        if not condition:
            raise self.failed(name, detail)

    def failed(self, name: str, detail: str) -> SelfCheckError:
        error = SelfCheckError(self.feature, name, detail)
        _FAILURES[self.feature] = str(error)
        return error


def nf4_is_accepted() -> bool:
    """Whether vLLM's own ``CacheConfig`` takes ``cache_dtype="nf4"`` (what the CLI validates)."""
    from vllm.config import CacheConfig

    from vllm_nf4kv.format import KV_CACHE_DTYPE

    try:
        CacheConfig(cache_dtype=KV_CACHE_DTYPE)
    except Exception:  # pydantic.ValidationError; vLLM may wrap it
        return False
    return True


def run_self_check(feature: str, check: Any) -> None:
    """Run ``check()``; a pass clears an earlier failure of ``feature`` (a re-registration)."""
    check()
    _FAILURES.pop(feature, None)


# -- the prefix-cache TTL -------------------------------------------------------------

_BLOCK = 4  # tokens per block in the check's pool


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _cached_request(pool: Any, name: str, num_blocks: int) -> list[Any]:
    """What vLLM's KV-cache manager does for a new prompt: take blocks, cache the full ones."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    tokens = [7] * (_BLOCK * num_blocks)
    request = Request(f"nf4kv-self-check-{name}", tokens, SamplingParams(max_tokens=1), None)
    request.block_hashes = [f"nf4kv-self-check-{name}-{i}".encode() for i in range(num_blocks)]
    blocks = pool.get_new_blocks(num_blocks)
    pool.cache_full_blocks(request, blocks, 0, num_blocks, _BLOCK, 0)
    return blocks


def _hits(pool: Any, name: str, num_blocks: int) -> int:
    """How many leading blocks of prompt ``name`` a new request would find in the cache."""
    for i in range(num_blocks):
        if pool.get_cached_block(f"nf4kv-self-check-{name}-{i}".encode(), [0]) is None:
            return i
    return num_blocks


def check_ttl_pool() -> None:
    """The TTL policy on a real vLLM ``BlockPool``: tracked, hit, expired, by server and request TTL."""
    from vllm.v1.core import kv_cache_coordinator

    from vllm_nf4kv.ttl.pool import enable_ttl, request_ttl_scope

    steps = _Steps(TTL_FEATURE)
    with steps.step("build a 6-block BlockPool with a 1 s TTL on a fake clock"):
        pool = kv_cache_coordinator.BlockPool(num_gpu_blocks=6, enable_caching=True, hash_block_size=_BLOCK)
        clock = _FakeClock()
        state = enable_ttl(pool, 1.0, request_ttls=True, clock=clock)
    with steps.step("cache two full blocks and release them"):
        blocks = _cached_request(pool, "server", 2)
        pool.free_blocks(reversed(blocks))
    ids = sorted(block.block_id for block in blocks)
    steps.expect(
        "a released cached block is tracked for expiry",
        all(block_id in state.released for block_id in ids),
        f"blocks {ids} released, tracked: {sorted(state.released)} (KVCacheBlock.pool: "
        f"{type(getattr(blocks[0], 'pool', None)).__name__})",
    )
    clock.now = 0.5
    with steps.step("a lookup within the TTL"):
        hits = _hits(pool, "server", 2)
    steps.expect("a lookup within the TTL", hits == 2, f"{hits} of 2 blocks hit at 0.5 s")
    clock.now = 1.5
    with steps.step("expiry after the TTL"):
        hits = _hits(pool, "server", 2)
        pool.nf4kv_sweep()
    front = sorted(block.block_id for block in pool.free_block_queue.get_all_free_blocks()[:2])
    steps.expect(
        "expiry after the TTL",
        hits == 0 and state.expired_by_server == 2 and front == ids,
        f"at 1.5 s: {hits} hits, {state.expired_by_server} expired, queue front {front} (want {ids})",
    )
    with steps.step("cache a block under a 0.25 s request TTL and release it"):
        with request_ttl_scope(pool, 0.25):
            blocks = _cached_request(pool, "request", 1)
        pool.free_blocks(blocks)
    clock.now = 1.7
    with steps.step("expiry by the request TTL"):
        early = _hits(pool, "request", 1)
        clock.now = 1.8
        late = _hits(pool, "request", 1)
    steps.expect(
        "expiry by the request TTL",
        (early, late, state.expired_by_request) == (1, 0, 1),
        f"hits at 0.2 s / 0.3 s after release: {early} / {late}, expired by request: "
        f"{state.expired_by_request}",
    )


# -- --kv-cache-dtype nf4 -------------------------------------------------------------------


def check_nf4_dtype() -> None:
    """vLLM accepts nf4, routes an nf4 layer to the nf4 backend, and sizes pages by the cell."""
    import torch
    from vllm.platforms import current_platform
    from vllm.v1.attention.selector import AttentionSelectorConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_nf4kv.backends.common import nf4_spec
    from vllm_nf4kv.backends.selection import CPU_BACKEND, CUDA_BACKEND
    from vllm_nf4kv.format import KV_CACHE_DTYPE, format_for

    steps = _Steps(NF4_FEATURE)
    with steps.step("CacheConfig(cache_dtype='nf4')"):
        accepted = nf4_is_accepted()
    steps.expect("CacheConfig(cache_dtype='nf4')", accepted, "vLLM's CacheConfig refuses 'nf4'")
    head_size, block_size, kv_heads = 128, 16, 2
    selector = AttentionSelectorConfig(
        head_size=head_size, dtype=torch.bfloat16, kv_cache_dtype=KV_CACHE_DTYPE, block_size=None
    )
    platform_cls = type(current_platform)
    if current_platform.is_cpu() or current_platform.is_cuda():
        want = CPU_BACKEND if current_platform.is_cpu() else CUDA_BACKEND
        with steps.step(f"{platform_cls.__name__}.get_attn_backend_cls for an nf4 layer"):
            got = platform_cls.get_attn_backend_cls(None, selector)
        steps.expect(
            f"{platform_cls.__name__}.get_attn_backend_cls for an nf4 layer",
            got == want,
            f"answered {got!r}, want {want!r} (vLLM's own kernels would read nf4 pages as another format)",
        )
    cell = format_for(KV_CACHE_DTYPE, head_size).cell_bytes
    with steps.step("FullAttentionSpec sized by the nf4 cell"):
        spec = FullAttentionSpec(
            block_size=block_size, num_kv_heads=kv_heads, head_size=head_size, dtype=torch.uint8
        )
        page = nf4_spec(spec).page_size_bytes
    steps.expect(
        "FullAttentionSpec sized by the nf4 cell",
        page == block_size * kv_heads * cell,
        f"page {page} B, want {block_size} tokens x {kv_heads} heads x {cell} B",
    )
