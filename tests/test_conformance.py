"""Every cell format through every implementation: the table a new format is added to.

For each layout in ``FORMATS`` and each implementation of the store and of attention:

* store: the cache bytes equal the reference codec's (``reference.write_paged``), bit for
  bit, on the same model-space K/V, special values included (NaN, +-inf, 1e30, zeros);
* attention: the output over the same cache is within ``ATTENTION_TOLERANCE`` (fp32) of
  ``reference_attention``, for decode, chunked prefill and whole prefill in one batch,
  with GQA, across block boundaries, and with a sliding window where the implementation
  has one (``kernel_limits``).

Implementations: the PyTorch fallback path (attention only: the reference codec *is* its
store), the C++ kernels built for this CPU (AVX-512; skipped with the reason where the CPU
has none) and built portable (``-march=x86-64-v3``), and the Triton kernels (under the
interpreter here, compiled on a GPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import triton_interpreted  # at import, before anything else imports Triton (see triton_interpreted)
from paged_cases import fill_cache

from vllm_nf4kv import cpu_kernels, reference
from vllm_nf4kv.format import KV_CACHE_DTYPE, CellLayout, RowFormat, ScaleScheme, format_for
from vllm_nf4kv.kernel_limits import CPU_LIMITS, CUDA_LIMITS
from vllm_nf4kv.paged_attention import paged_attention
from vllm_nf4kv.reference_attention import ATTENTION_TOLERANCE, paged_attention_reference
from vllm_nf4kv.rotation import rotate, unrotate

FORMATS = {
    **{f"{KV_CACHE_DTYPE}-d{d}": format_for(KV_CACHE_DTYPE, d) for d in (64, 128, 256)},
    # K and V differ in group size and search steps: no code path may assume they agree
    "split-d128": CellLayout(RowFormat(128, 16, search_steps=1), RowFormat(128, 32, search_steps=8)),
    # the schemes the other way round (ue5m3 keys, two-level 3-bit values, codes crossing bytes)
    "two-level-values-d64": CellLayout(
        RowFormat(64, 16),
        RowFormat(64, 8, search_steps=3, scale_scheme=ScaleScheme.TWO_LEVEL, relative_bits=3),
    ),
}
BLOCK_SIZE = 16
NUM_KV_HEADS, GQA = 2, 3
SEQ_LENS = [1, 37, 40, 20]  # a first decode, a decode, a 7-token chunk after 33, a whole prefill
QUERY_LENS = [1, 1, 7, 20]
WINDOW = 8


# ---------------------------------------------------------------- implementations


@pytest.fixture(scope="session")
def cpp_avx512():
    ops = cpu_kernels.build()
    if not ops.has_avx512():
        pytest.skip("this CPU has no AVX-512 (F, BW, VL): the native build is the portable one")
    return ops


@pytest.fixture(scope="session")
def cpp_portable():
    return cpu_kernels.build("nf4kv_cpu_portable", "-march=x86-64-v3")


@pytest.fixture(scope="session")
def triton_kernels():
    return triton_interpreted


def _with_triton_env(kernels, call: Callable[[], torch.Tensor | None]):
    with contextlib.contextmanager(kernels.interpreter_env)():
        return call()


def store_with(name: str, request) -> Callable:
    """store(cache, key, value, slots, layout) of one implementation, on model-space K/V."""
    if name == "triton":
        kernels = request.getfixturevalue("triton_kernels")

        def store(cache, key, value, slots, layout):
            store_kv_nf4 = kernels.triton_store.store_kv_nf4
            _with_triton_env(kernels, lambda: store_kv_nf4(cache, key, value, slots, layout))

        return store
    ops = request.getfixturevalue(name)
    return lambda cache, key, value, slots, layout: cpu_kernels.store(
        cache, key, value, slots, layout, ops=ops)


def attention_with(name: str, request) -> Callable:
    """attend(query, cache, table, layout, window) -> model-space fp32/fp64 output."""
    starts = torch.tensor([0, *torch.tensor(QUERY_LENS).cumsum(0).tolist()])
    lens = torch.tensor(SEQ_LENS)
    if name == "pytorch":
        return lambda q, cache, table, layout, window: unrotate(
            paged_attention(rotate(q, torch.float64), cache, layout, starts, lens, table, _scale(layout),
                            sliding_window=window), torch.float64)
    if name == "triton":
        kernels = request.getfixturevalue("triton_kernels")

        def attend(q, cache, table, layout, window):
            return _with_triton_env(kernels, lambda: kernels.triton_attention.nf4_paged_attention(
                q.float(), cache, table, starts.int(), lens.int(), layout, _scale(layout)))

        return attend
    ops = request.getfixturevalue(name)
    return lambda q, cache, table, layout, window: cpu_kernels.attention(
        q, cache, layout, starts, lens, table, _scale(layout), True, window, ops=ops)


def _scale(layout: CellLayout) -> float:
    return layout.head_dim**-0.5


SUPPORTS_WINDOW = {"pytorch": True, "cpp_avx512": CPU_LIMITS.sliding_window,
                   "cpp_portable": CPU_LIMITS.sliding_window, "triton": CUDA_LIMITS.sliding_window}


# ---------------------------------------------------------------- inputs


def _kv(layout: CellLayout, num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-space K/V with magnitudes over many octaves and every kind of special value."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_tokens, NUM_KV_HEADS, layout.head_dim)
    octaves = torch.randint(-12, 13, (2, *shape[:-1], 1), generator=gen).float()
    key, value = torch.randn(2, *shape, generator=gen) * torch.exp2(octaves)
    key[0, 0, 3], key[1, 1, 5], key[2, 0, 7] = float("nan"), float("inf"), float("-inf")
    value[3, 1, 0], value[4, 0] = 1e30, 0.0
    key[5, 1] *= 1e-30  # below the smallest scale
    return key, value


# ---------------------------------------------------------------- store


@pytest.mark.parametrize("impl", ["cpp_avx512", "cpp_portable", "triton"])
@pytest.mark.parametrize("layout_name", list(FORMATS))
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 1e30 squared in the search
def test_store_bytes_equal_the_reference(impl, layout_name, request):
    layout = FORMATS[layout_name]
    num_blocks, num_tokens = 6, 40
    key, value = _kv(layout, num_tokens, seed=len(layout_name))
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=torch.Generator().manual_seed(1))[:num_tokens]
    slots[::9] = -1  # padding tokens are skipped
    untouched = torch.randint(0, 256, (num_blocks, NUM_KV_HEADS, BLOCK_SIZE, layout.cell_bytes),
                              generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    expected, got = untouched.clone(), untouched.clone()
    reference.write_paged(expected, key, value, slots, layout)
    store_with(impl, request)(got, key, value, slots, layout)
    bad = (got != expected).any(-1).nonzero().tolist()
    assert not bad, f"{impl}: {len(bad)} cells unlike the reference, first at (block, head, slot) {bad[0]}"


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("window", [None, WINDOW], ids=["full", "window"])
@pytest.mark.parametrize("impl", ["pytorch", "cpp_avx512", "cpp_portable", "triton"])
@pytest.mark.parametrize("layout_name", list(FORMATS))
def test_attention_within_tolerance_of_the_reference(impl, layout_name, window, request):
    if window is not None and not SUPPORTS_WINDOW[impl]:
        pytest.skip(f"{impl} has no sliding window (kernel_limits); selection refuses such models")
    layout = FORMATS[layout_name]
    cache, table, _ = fill_cache(SEQ_LENS, NUM_KV_HEADS, layout.head_dim, BLOCK_SIZE, seed=3, layout=layout)
    gen = torch.Generator().manual_seed(4)
    query = torch.randn(sum(QUERY_LENS), NUM_KV_HEADS * GQA, layout.head_dim, generator=gen)
    starts = [0, *torch.tensor(QUERY_LENS).cumsum(0).tolist()]
    want = unrotate(paged_attention_reference(rotate(query, torch.float64), cache, table, starts, SEQ_LENS,
                                              layout, _scale(layout), sliding_window=window), torch.float64)
    got = attention_with(impl, request)(query, cache, table, layout, window)
    atol, rtol = ATTENTION_TOLERANCE[torch.float32]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
