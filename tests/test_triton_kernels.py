"""Triton NF4 kernels against the pure-torch reference (``vllm_nf4kv.reference``).

The kernels are imported through ``tests/triton_interpreted.py``: under the Triton
interpreter on a machine without CUDA, compiled on the GPU on a CUDA machine (force the
interpreter there with ``TRITON_INTERPRET=1``).

What is compared, for the shipped layouts (two-level K rows, per-group ue5m3 V rows) and for
``SCHEME_LAYOUTS`` (the schemes the other way round, other relative bits):
* store: cache bytes equal, bit for bit, to ``reference.write_paged`` of the same model-space
  rows (the kernel calibrates, sanitizes and rotates them itself), whatever the number of
  tokens in the call; with ``prepared=True``, to the reference codec alone on rotated rows;
* load: equal to ``reference.read_paged`` (exact in fp32; fp16/bf16 are the
  reference's fp32 values rounded to nearest even);
* attention: model-space queries and outputs, against ``unrotate(reference_attention(rotate(q)))``
  over the *same dequantized cache*, so quantization error is excluded; tolerances in
  ``ATTENTION_TOLERANCE`` (fp32 dots and fp32 output: 1e-5; fp16 dots/output: 3e-3; bf16:
  2e-2, i.e. about two bf16 ulps); and a query's output bit for bit the same alone, in a
  mixed batch, split or not, and as the last row of a prefill.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from triton_interpreted import (
    DEVICE,
    INTERPRET,
    interpreter_env,
    triton,
    triton_attention,
    triton_codec,
    triton_load,
    triton_store,
)

from vllm_nf4kv import reference
from vllm_nf4kv.format import SCALE_MAX, CellLayout, RowFormat, ScaleScheme, format_for, relative_ladder
from vllm_nf4kv.kernel_limits import CUDA_LIMITS
from vllm_nf4kv.reference_attention import ATTENTION_TOLERANCE, paged_attention_reference
from vllm_nf4kv.rotation import rotate, unrotate

store_kv_nf4 = triton_store.store_kv_nf4
load_kv_nf4 = triton_load.load_kv_nf4  # tests/triton_load.py: no serving path reads K/V back
nf4_paged_attention = triton_attention.nf4_paged_attention

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        not INTERPRET and not torch.cuda.is_available(),
        reason="compiled Triton needs CUDA; set TRITON_INTERPRET=1",
    ),
]

_interpreter_env = pytest.fixture(scope="module", autouse=True)(interpreter_env)


# Shapes kept small: the interpreter runs every program in Python (~2-50 ms each).
HEAD_DIMS = [64, 128, 256]
ODD_HEAD_DIMS = [48, 96]  # group sizes 16 / 24: padded tiles, 3 groups, non-power-of-two groups
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCK_SIZES = [16, 128]
GQA_RATIOS = [1, 4, 8]
SEARCH_STEPS = [1, 4]
# K and V rows each take either scale scheme: per-group K with two-level V (3-bit codes, fields
# straddling bytes), and two-level rows at 3 and 8 bits (a 256-rung ladder, byte-aligned fields).
SCHEME_LAYOUTS = {
    "k-ue5m3-v-r3": CellLayout(RowFormat(64, 32), RowFormat(64, 16, 4, ScaleScheme.TWO_LEVEL, 3)),
    "k-r3-v-r8": CellLayout(
        RowFormat(64, 16, 4, ScaleScheme.TWO_LEVEL, 3), RowFormat(64, 8, 2, ScaleScheme.TWO_LEVEL, 8)
    ),
}


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- helpers


def _rand_rows(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Gaussian rows with per-row magnitudes over several octaves (exercises scale codes)."""
    x = torch.randn(*shape, generator=gen)
    return x * torch.exp2(torch.randint(-6, 7, (*shape[:-1], 1), generator=gen).float())


def _reference_cells(
    key_rot: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim] rotated
    value_rot: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim] rotated
    layout: CellLayout,
) -> torch.Tensor:  # [num_tokens, num_kv_heads, cell_bytes] uint8
    """The reference codec applied to the same rotated input."""
    key_rows = reference.quantize_rows(key_rot.cpu(), layout.key)
    return torch.cat([key_rows, reference.quantize_rows(value_rot.cpu(), layout.value)], -1)


def _expected_cache(
    cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8 (not modified)
    key_rot: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim] rotated
    value_rot: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim] rotated
    slots: torch.Tensor,  # [num_tokens], < 0 skipped
    layout: CellLayout,
) -> torch.Tensor:  # CPU copy of cache with the reference's cells at the slots
    expected = cache.cpu().clone()
    valid = (slots >= 0).cpu()
    s = slots.cpu()[valid].long()
    block_size = cache.shape[2]
    expected[s // block_size, :, s % block_size] = _reference_cells(key_rot[valid], value_rot[valid], layout)
    return expected


def _paged_batch(
    gen: torch.Generator,
    layout: CellLayout,
    num_kv_heads: int,
    block_size: int,
    seq_lens: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache filled by the reference codec through a shuffled block table."""
    blocks_per_seq = max(-(-s // block_size) for s in seq_lens)
    num_blocks = blocks_per_seq * len(seq_lens) + 2
    cache = torch.zeros(num_blocks, num_kv_heads, block_size, layout.cell_bytes, dtype=torch.uint8)
    table = torch.randperm(num_blocks, generator=gen)[: blocks_per_seq * len(seq_lens)]
    table = table.view(len(seq_lens), blocks_per_seq)
    for seq, seq_len in enumerate(seq_lens):
        pos = torch.arange(seq_len)
        slots = table[seq][pos // block_size] * block_size + pos % block_size
        key = torch.randn(seq_len, num_kv_heads, layout.head_dim, generator=gen)
        value = torch.randn(seq_len, num_kv_heads, layout.head_dim, generator=gen)
        reference.write_paged(cache, key, value, slots, layout)
    return cache.to(DEVICE), table.to(torch.int32).to(DEVICE)


def _run_attention(
    gen: torch.Generator,
    head_dim: int,
    num_kv_heads: int,
    gqa: int,
    block_size: int,
    seq_lens: list[int],
    q_lens: list[int],
    dtype: torch.dtype,
    split: bool | None = None,
    causal: bool = True,
    padding_tokens: int = 0,
    layout: CellLayout | None = None,
    chunk_tokens: int = 64,
    calibrated: bool = False,
) -> torch.Tensor:
    """Attention of model-space queries against the reference; returns the kernel's output."""
    layout = layout or format_for("nf4", head_dim)
    cache, table = _paged_batch(gen, layout, num_kv_heads, block_size, seq_lens)
    starts = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    query_start_loc = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    num_tokens = sum(q_lens) + padding_tokens
    query = torch.randn(num_tokens, num_kv_heads * gqa, head_dim, generator=gen).to(dtype)
    tables = {}
    if calibrated:  # KVTransform's query_scale (1 / d) and output_offset (mu)
        tables = {
            "query_scale": torch.rand(num_kv_heads * gqa, head_dim, generator=gen) + 0.5,
            "output_offset": torch.randn(num_kv_heads * gqa, head_dim, generator=gen),
        }
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = nf4_paged_attention(
        query.to(DEVICE),
        cache,
        table,
        query_start_loc,
        seq_lens_t,
        layout,
        scale,
        max_query_len=max(q_lens),
        causal=causal,
        split=split,
        chunk_tokens=chunk_tokens,
        **{name: t.to(DEVICE) for name, t in tables.items()},
    )
    assert out.dtype == dtype and out.shape == query.shape
    q = query.float() * tables["query_scale"] if calibrated else query
    expected = paged_attention_reference(
        rotate(q), cache.cpu(), table.cpu(), query_start_loc.cpu(), seq_lens_t.cpu(), layout, scale,
        causal=causal,
    )
    expected = unrotate(expected, torch.float64) + (tables["output_offset"] if calibrated else 0)
    atol, rtol = ATTENTION_TOLERANCE[dtype]
    valid = sum(q_lens)
    torch.testing.assert_close(out[:valid].float().cpu(), expected[:valid].float(), atol=atol, rtol=rtol)
    return out


# ---------------------------------------------------------------- store


@pytest.mark.parametrize("head_dim", HEAD_DIMS + ODD_HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_store_matches_reference_exactly(head_dim: int, dtype: torch.dtype) -> None:
    """Model-space rows in: the kernel sanitizes and rotates them itself (NaN and inf included)."""
    gen = torch.Generator().manual_seed(head_dim)
    layout = format_for("nf4", head_dim)
    num_tokens, num_kv_heads, block_size, num_blocks = 12, 2, 16, 3
    key = _rand_rows(gen, num_tokens, num_kv_heads, head_dim).to(dtype)
    value = _rand_rows(gen, num_tokens, num_kv_heads, head_dim).to(dtype)
    key[2, 0, 5], value[3, 1, 7], key[4, 1, 0] = float("nan"), float("inf"), float("-inf")
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    cache = torch.randint(
        0, 256, (num_blocks, num_kv_heads, block_size, layout.cell_bytes), generator=gen, dtype=torch.uint8
    )
    expected = cache.clone()
    reference.write_paged(expected, key, value, slots, layout)
    cache = cache.to(DEVICE)
    store_kv_nf4(cache, key.to(DEVICE), value.to(DEVICE), slots.to(DEVICE), layout)
    assert torch.equal(cache.cpu(), expected)


@pytest.mark.parametrize("head_dim", [64, 96])
def test_store_applies_the_calibration_exactly(head_dim: int) -> None:
    """``(k - c) * d`` and ``v - mu`` inside the kernel: ``write_paged``'s bytes after ``KVTransform``."""
    from vllm_nf4kv.kv_transform import KVTransform

    gen = torch.Generator().manual_seed(head_dim + 1)
    layout = format_for("nf4", head_dim)
    key_bias = 30 * torch.randn(2, head_dim, generator=gen)
    value_bias = 10 * torch.randn(2, head_dim, generator=gen)
    key = (_rand_rows(gen, 9, 2, head_dim) + key_bias).to(torch.bfloat16)
    value = (_rand_rows(gen, 9, 2, head_dim) + value_bias).to(torch.bfloat16)
    transform = KVTransform(
        torch.rand(2, head_dim, generator=gen) * 3 + 0.25,  # d
        30 * torch.randn(2, head_dim, generator=gen),  # c
        10 * torch.randn(2, head_dim, generator=gen),  # mu
        num_heads=8,
    )
    slots = torch.randperm(32, generator=gen)[:9]
    expected = torch.zeros(2, 2, 16, layout.cell_bytes, dtype=torch.uint8)
    reference.write_paged(expected, transform.keys(key), transform.values(value), slots, layout)
    cache = torch.zeros_like(expected, device=DEVICE)
    tables = transform.store_tables(torch.device(DEVICE))
    store_kv_nf4(cache, key.to(DEVICE), value.to(DEVICE), slots.to(DEVICE), layout, **tables)
    assert torch.equal(cache.cpu(), expected)
    uncalibrated = torch.zeros_like(cache)
    store_kv_nf4(uncalibrated, key.to(DEVICE), value.to(DEVICE), slots.to(DEVICE), layout)
    assert not torch.equal(uncalibrated, cache)  # the tables are read


def test_store_bytes_do_not_depend_on_the_call_size() -> None:
    """Rows stored in calls of 1, 7, 64 and 1,000 tokens give the same bytes (the other tokens
    of a call are other rows, or padding with slot -1, which the interpreter skips quickly)."""
    gen = torch.Generator().manual_seed(1000)
    layout, block_size, rows = format_for("nf4", 64), 16, 6
    key = _rand_rows(gen, 1000, 1, 64).to(torch.bfloat16)
    value = _rand_rows(gen, 1000, 1, 64).to(torch.bfloat16)
    expected = torch.zeros(1, 1, block_size, layout.cell_bytes, dtype=torch.uint8)
    reference.write_paged(expected, key[:rows], value[:rows], torch.arange(rows), layout)
    for size in (1, 7, 64, 1000):
        cache = torch.zeros_like(expected, device=DEVICE)
        for row in range(rows):
            at = (row * 389) % size  # the row's place in its call
            slots = torch.full((size,), -1, dtype=torch.int64)
            slots[at] = row
            k, v = key.roll(at - row, 0)[:size], value.roll(at - row, 0)[:size]  # row lands at `at`
            store_kv_nf4(cache, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE), layout)
        assert torch.equal(cache.cpu(), expected), size


@pytest.mark.parametrize("search_steps", SEARCH_STEPS)
@pytest.mark.parametrize("relative_bits", [0, 5], ids=["ue5m3", "r5"])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 3e38 - level * scale, squared
def test_store_special_values_and_split_group_sizes(search_steps: int, relative_bits: int) -> None:
    """The codec alone (prepared rows): zero groups, NaN, +-inf, huge and tiny values; K and V with
    different group sizes; per-group ue5m3 rows, or two-level K rows beside per-group V rows."""
    key = RowFormat(64, 16, search_steps)
    if relative_bits:
        key = RowFormat(64, 16, search_steps, ScaleScheme.TWO_LEVEL, relative_bits)
    layout = CellLayout(key, RowFormat(64, 32, search_steps))
    rows = torch.randn(6, 1, 64, generator=torch.Generator().manual_seed(7))
    rows[0] = 0.0
    rows[1, 0, 3], rows[1, 0, 40] = float("nan"), float("inf")
    rows[2, 0, 17], rows[2, 0, 63] = float("-inf"), 3e38
    rows[3] *= 1e-30  # below the smallest scale
    rows[4] *= 1e5  # above the largest scale
    rows[5, 0, :16] = 0.0  # one all-zero group beside normal ones
    slots = torch.arange(6)
    cache = torch.zeros(1, 1, 16, layout.cell_bytes, dtype=torch.uint8)
    expected = _expected_cache(cache, rows, rows.flip(0), slots, layout)
    cache = cache.to(DEVICE)
    store_kv_nf4(cache, rows.to(DEVICE), rows.flip(0).to(DEVICE), slots.to(DEVICE), layout, prepared=True)
    assert torch.equal(cache.cpu(), expected)


@pytest.mark.parametrize("layout_name", list(SCHEME_LAYOUTS))
def test_store_scheme_layouts_match_write_paged(layout_name: str) -> None:
    """Model-space K/V over many octaves: the kernel's bytes equal ``reference.write_paged``'s."""
    layout = SCHEME_LAYOUTS[layout_name]
    gen = torch.Generator().manual_seed(len(layout_name))
    key, value = _rand_rows(gen, 20, 2, 64), _rand_rows(gen, 20, 2, 64)
    key[3, 0, :32] *= 2.0**-9  # small groups beside large ones: rungs far down the ladder
    value[4, 1, 8:] *= 2.0**-9
    slots = torch.randperm(48, generator=gen)[:20]
    slots[::7] = -1
    expected = torch.randint(0, 256, (3, 2, 16, layout.cell_bytes), generator=gen, dtype=torch.uint8)
    cache = expected.clone().to(DEVICE)
    reference.write_paged(expected, key, value, slots, layout)
    store_kv_nf4(cache, key.to(DEVICE), value.to(DEVICE), slots.to(DEVICE), layout)
    assert torch.equal(cache.cpu(), expected)


@pytest.mark.parametrize("search_steps", SEARCH_STEPS)
@pytest.mark.parametrize("relative_bits", [1, 3, 5, 8])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 1e38 - level * scale, squared
def test_store_two_level_edges(relative_bits: int, search_steps: int) -> None:
    """Where the two-level search turns: a group exactly on a rung (``>=`` covers it), groups
    below the ladder's last rung (every candidate clamps to it), an all-zero row (row code 0),
    a row past SCALE_MAX (no rung covers its big group: the search starts at rung 0), and
    8 groups of codes packed LSB first across byte boundaries."""
    rung = min(5, 2**relative_bits - 1)
    ladder = relative_ladder(relative_bits)
    fmt = RowFormat(64, 8, search_steps, ScaleScheme.TWO_LEVEL, relative_bits)
    layout = CellLayout(fmt, fmt)
    rows = torch.randn(5, 1, 64, generator=torch.Generator().manual_seed(relative_bits))
    rows[0, 0, 0] = 4.0  # the row code of 4.0, exactly
    rows[0, 0, 8:16] = torch.linspace(-1, 1, 8) * (4.0 * ladder[rung])  # absmax exactly on a rung
    rows[1, 0, 8:] *= 1e-6  # far below the last rung of the first group's row scale
    rows[2] = 0.0
    rows[3, 0, 5] = 1e38  # past SCALE_MAX: the row code clamps
    rows[4, 0, ::8] = -3.5  # every group's absmax equal: the row scale covers each (rung 0)
    cache = torch.zeros(1, 1, 16, layout.cell_bytes, dtype=torch.uint8)
    expected = _expected_cache(cache, rows, rows.flip(0), torch.arange(5), layout)
    _, row_codes, relative = reference.quantize_two_level(rows[:, 0], 8, relative_bits, search_steps)
    assert float(reference.decode_scale(row_codes[0])) == 4.0
    assert float(rows[0, 0, 8:16].abs().max()) == 4.0 * ladder[rung]
    assert row_codes[2] == 0 and float(reference.decode_scale(row_codes[3])) == SCALE_MAX
    assert bool((relative[1, 1:] == 2**relative_bits - 1).all())
    if search_steps == 1:  # the stored rung is where the search starts
        assert relative[0, 1] == rung and relative[3, 0] == 0 and bool((relative[4] == 0).all())
    cache = cache.to(DEVICE)
    store_kv_nf4(
        cache, rows.to(DEVICE), rows.flip(0).to(DEVICE), torch.arange(5, device=DEVICE), layout, prepared=True
    )
    assert torch.equal(cache.cpu(), expected)
    key, _ = load_kv_nf4(
        cache, torch.zeros(1, 1, dtype=torch.int32, device=DEVICE), torch.tensor([5], device=DEVICE), layout
    )
    assert torch.equal(key[0].cpu(), reference.read_paged(expected, torch.zeros(1), 5, layout)[0])


def test_cuda_limits_name_both_scale_schemes() -> None:
    """Selection refuses by ``CUDA_LIMITS``; the kernels implement every scheme it names (a row
    of each gets its ``RELATIVE_BITS`` constexpr), both of today's among them."""
    rows = {
        ScaleScheme.UE5M3_PER_GROUP: RowFormat(64, 16),
        ScaleScheme.TWO_LEVEL: RowFormat(64, 8, 8, ScaleScheme.TWO_LEVEL, 5),
    }
    assert set(rows) <= set(CUDA_LIMITS.scale_schemes)
    assert [triton_codec.relative_bits(rows[scheme]) for scheme in CUDA_LIMITS.scale_schemes] == [0, 5]
    assert not CUDA_LIMITS.layout_refusals(format_for("nf4", 128))
    for layout in SCHEME_LAYOUTS.values():
        assert not CUDA_LIMITS.layout_refusals(layout)


def test_store_matches_write_paged_end_to_end() -> None:
    """The kernel reads strided views, as vLLM's key/value are slices of one qkv tensor."""
    gen = torch.Generator().manual_seed(3)
    layout = format_for("nf4", 128)
    key = _rand_rows(gen, 10, 2, 128).to(torch.bfloat16)
    value = _rand_rows(gen, 10, 2, 128).to(torch.bfloat16)
    slots = torch.randperm(32, generator=gen)[:10]
    expected = torch.zeros(2, 2, 16, layout.cell_bytes, dtype=torch.uint8)
    reference.write_paged(expected, key, value, slots, layout)
    packed = torch.zeros(10, 2, 3, 128, device=DEVICE)  # [num_tokens, num_kv_heads, (q, k, v), head_dim]
    packed[:, :, 1], packed[:, :, 2] = key.to(DEVICE), value.to(DEVICE)
    cache = torch.zeros_like(expected, device=DEVICE)
    store_kv_nf4(cache, packed[:, :, 1], packed[:, :, 2], slots.to(DEVICE), layout)
    assert torch.equal(cache.cpu(), expected)


# A group (already rotated, group size 16) whose best two scale codes have squared errors within
# fp32 summation-order noise: torch.sum's vectorized order picks 132 on x86 CPUs, the fixed
# pairwise order (neighbours (0,1), (2,3), ... level by level) picks 133. Found by searching 3.5M
# random groups (1 such group). The kernel and reference.pairwise_sum follow the pairwise order.
_NEAR_TIE_ROW = [
    "0x1.38b272p-3",
    "-0x1.036734p-1",
    "0x1.14a2aep-3",
    "-0x1.916be8p-2",
    "-0x1.0f327cp-4",
    "-0x1.b08a72p+0",
    "-0x1.0bb650p-1",
    "-0x1.3cee66p-2",
    "-0x1.a308e0p-1",
    "-0x1.e387eep-2",
    "0x1.3b041ep-1",
    "0x1.a9e17ap-1",
    "0x1.2c643ap+0",
    "-0x1.fd9388p-1",
    "0x1.7f2ff8p+0",
    "0x1.f1d6fcp-2",
]


def test_store_near_tie_follows_pairwise_order() -> None:
    layout = CellLayout(RowFormat(16, 16), RowFormat(16, 16))
    row = torch.tensor([float.fromhex(h) for h in _NEAR_TIE_ROW]).view(1, 1, 16)
    cache = torch.zeros(1, 1, 16, layout.cell_bytes, dtype=torch.uint8, device=DEVICE)
    slot = torch.tensor([0], device=DEVICE)
    store_kv_nf4(cache, row.to(DEVICE), row.to(DEVICE), slot, layout, prepared=True)
    assert cache[0, 0, 0, layout.key.code_bytes].item() == 133
    _, ref_scale = reference.quantize_groups(row, 16)
    assert ref_scale.item() == 133  # reference.pairwise_sum: the same fixed order
    assert torch.equal(
        cache.cpu(), _expected_cache(torch.zeros_like(cache.cpu()), row, row, torch.tensor([0]), layout)
    )


def test_store_skips_negative_slots_and_padding_tokens() -> None:
    gen = torch.Generator().manual_seed(5)
    layout = format_for("nf4", 64)
    key_rot = rotate(torch.randn(9, 2, 64, generator=gen))  # 9 tokens, only 7 slots: 2 padding tokens
    value_rot = rotate(torch.randn(9, 2, 64, generator=gen))
    slots = torch.tensor([5, -1, 0, 31, -1, 17, 2])
    cache = torch.full((2, 2, 16, layout.cell_bytes), 0xAB, dtype=torch.uint8)
    expected = _expected_cache(cache, key_rot[:7], value_rot[:7], slots, layout)
    store = partial(store_kv_nf4, prepared=True)
    cache = cache.to(DEVICE)
    store(cache, key_rot.to(DEVICE), value_rot.to(DEVICE), slots.to(DEVICE), layout)
    assert torch.equal(cache.cpu(), expected)
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert bool((cache.cpu().transpose(1, 2).flatten(0, 1)[untouched] == 0xAB).all())
    store(cache, key_rot.to(DEVICE), value_rot.to(DEVICE), torch.full((4,), -1, device=DEVICE), layout)
    assert torch.equal(cache.cpu(), expected)


def _huge_cache(layout: CellLayout, block_size: int) -> torch.Tensor:
    """A cache whose last blocks start past 2**31 bytes (untouched pages cost no memory)."""
    num_blocks = int(1.25 * 2**31) // (block_size * layout.cell_bytes)
    return torch.empty(num_blocks, 1, block_size, layout.cell_bytes, dtype=torch.uint8, device=DEVICE)


def test_large_cache_offsets_are_int64() -> None:
    """Store, load and attention on blocks past 2**31 bytes with int32 slots and block table."""
    gen = torch.Generator().manual_seed(11)
    layout, block_size = format_for("nf4", 64), 16
    cache = _huge_cache(layout, block_size)
    num_blocks = cache.shape[0]
    assert (num_blocks - 3) * cache.stride(0) > 2**31
    seq_len = 2 * block_size + 5
    table = torch.tensor([[num_blocks - 1, num_blocks - 3, num_blocks - 2]], dtype=torch.int32)
    pos = torch.arange(seq_len)
    slots = (table[0].long()[pos // block_size] * block_size + pos % block_size).to(torch.int32)
    key_rot = rotate(torch.randn(seq_len, 1, 64, generator=gen))
    value_rot = rotate(torch.randn(seq_len, 1, 64, generator=gen))
    store_kv_nf4(cache, key_rot.to(DEVICE), value_rot.to(DEVICE), slots.to(DEVICE), layout, prepared=True)
    cells = _reference_cells(key_rot, value_rot, layout)  # [seq_len, 1, cell_bytes]
    s = slots.long().to(DEVICE)
    assert torch.equal(cache[s // block_size, :, s % block_size].cpu(), cells)
    expected = torch.zeros(3, 1, block_size, layout.cell_bytes, dtype=torch.uint8)  # same cells, blocks 0..2
    expected[pos // block_size, :, pos % block_size] = cells

    seq_lens = torch.tensor([seq_len], dtype=torch.int32, device=DEVICE)
    key, value = load_kv_nf4(cache, table.to(DEVICE), seq_lens, layout)
    ref_key, ref_value = reference.read_paged(expected, torch.arange(3), seq_len, layout)
    assert torch.equal(key[0].cpu(), ref_key) and torch.equal(value[0].cpu(), ref_value)

    query = torch.randn(1, 2, 64, generator=gen)
    query_start_loc = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    table = table.to(DEVICE)
    out = nf4_paged_attention(query.to(DEVICE), cache, table, query_start_loc, seq_lens, layout, 0.125)
    ref_out = paged_attention_reference(
        rotate(query), expected, torch.arange(3)[None], query_start_loc.cpu(), seq_lens.cpu(), layout, 0.125
    )
    torch.testing.assert_close(out.cpu(), unrotate(ref_out), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- load


@pytest.mark.parametrize("head_dim", [64, 128, 96])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=_dtype_id)
def test_load_matches_read_paged(head_dim: int, block_size: int, out_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(head_dim + block_size)
    layout = format_for("nf4", head_dim)
    seq_lens = [1, block_size, block_size + 3]
    cache, table = _paged_batch(gen, layout, 2, block_size, seq_lens)
    key, value = load_kv_nf4(cache, table, torch.tensor(seq_lens, device=DEVICE), layout, out_dtype=out_dtype)
    assert key.shape == (3, max(seq_lens), 2, head_dim) and key.dtype == out_dtype
    for seq, seq_len in enumerate(seq_lens):
        ref_key, ref_value = reference.read_paged(cache.cpu(), table[seq].cpu(), seq_len, layout)
        assert torch.equal(key[seq, :seq_len].cpu(), ref_key.to(out_dtype))
        assert torch.equal(value[seq, :seq_len].cpu(), ref_value.to(out_dtype))
        assert not key[seq, seq_len:].any() and not value[seq, seq_len:].any()


@pytest.mark.parametrize("layout_name", list(SCHEME_LAYOUTS))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_load_scheme_layouts_match_read_paged(layout_name: str, out_dtype: torch.dtype) -> None:
    layout = SCHEME_LAYOUTS[layout_name]
    gen = torch.Generator().manual_seed(len(layout_name))
    seq_lens = [1, 16, 35]
    cache, table = _paged_batch(gen, layout, 2, 16, seq_lens)
    key, value = load_kv_nf4(cache, table, torch.tensor(seq_lens, device=DEVICE), layout, out_dtype=out_dtype)
    for seq, seq_len in enumerate(seq_lens):
        ref_key, ref_value = reference.read_paged(cache.cpu(), table[seq].cpu(), seq_len, layout)
        assert torch.equal(key[seq, :seq_len].cpu(), ref_key.to(out_dtype))
        assert torch.equal(value[seq, :seq_len].cpu(), ref_value.to(out_dtype))


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("gqa", GQA_RATIOS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_decode_attention(head_dim: int, gqa: int, block_size: int) -> None:
    """One query per sequence; odd lengths and lengths on / around block boundaries."""
    gen = torch.Generator().manual_seed(head_dim * gqa + block_size)
    seq_lens = [1, 17, block_size, block_size + 1, 2 * block_size - 1]
    _run_attention(gen, head_dim, 2, gqa, block_size, seq_lens, [1] * len(seq_lens), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_decode_attention_dtypes_and_splits(dtype: torch.dtype, split: bool) -> None:
    """Chunks of 64 keys walked in one program, or one program a chunk and the merge kernel; a
    calibration's 1 / d and mu applied in the prologue and epilogue."""
    gen = torch.Generator().manual_seed(int(split))
    _run_attention(gen, 128, 2, 4, 16, [70, 150, 9], [1, 1, 1], dtype, split=split, calibrated=True)


def test_a_query_gets_the_same_bits_in_any_batch() -> None:
    """Batch invariance by construction: a decode query alone (split or not), in a mixed batch
    with prefills, and as the last row of its sequence's prefill (what a prefix-cache hit
    recomputes) gives the same output bits, with a calibration applied."""
    gen = torch.Generator().manual_seed(77)
    head_dim, num_kv_heads, gqa = 64, 2, 4
    layout = format_for("nf4", head_dim)
    seq_lens = [300, 41, 130]
    cache, table = _paged_batch(gen, layout, num_kv_heads, 16, seq_lens)
    query = torch.randn(1 + 41 + 1, num_kv_heads * gqa, head_dim, generator=gen).to(DEVICE)
    tables = {
        "query_scale": (torch.rand(num_kv_heads * gqa, head_dim, generator=gen) + 0.5).to(DEVICE),
        "output_offset": torch.randn(num_kv_heads * gqa, head_dim, generator=gen).to(DEVICE),
    }
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)

    def attend(rows: slice, seqs: slice, q_lens: list[int], split: bool) -> torch.Tensor:
        starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        return nf4_paged_attention(
            query[rows], cache, table[seqs], starts, lens[seqs], layout, head_dim**-0.5,
            split=split, chunk_tokens=64, max_chunks=5, **tables,
        )  # fmt: skip

    mixed = attend(slice(0, 43), slice(0, 3), [1, 41, 1], split=False)
    for split in (False, True):
        alone = attend(slice(0, 1), slice(0, 1), [1], split)
        assert torch.equal(alone[0], mixed[0]), split
        last = attend(slice(42, 43), slice(2, 3), [1], split)
        assert torch.equal(last[0], mixed[42]), split
        prefill_row = attend(slice(41, 42), slice(1, 2), [1], split)  # the prefill's last query alone
        assert torch.equal(prefill_row[0], mixed[41]), split
    assert torch.equal(attend(slice(0, 43), slice(0, 3), [1, 41, 1], split=True), mixed)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_prefill_and_chunked_prefill_attention(head_dim: int, block_size: int) -> None:
    """A mixed batch: full prefill, chunked prefill (context + new tokens), decode."""
    gen = torch.Generator().manual_seed(head_dim + block_size)
    seq_lens, q_lens = [37, 150, 20, 1], [37, 23, 1, 1]
    _run_attention(gen, head_dim, 2, 4, block_size, seq_lens, q_lens, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("gqa", GQA_RATIOS)
def test_prefill_attention_gqa_dtypes(dtype: torch.dtype, gqa: int) -> None:
    gen = torch.Generator().manual_seed(gqa)
    _run_attention(gen, 64, 1, gqa, 16, [33, 5], [19, 5], dtype)


def test_attention_odd_head_dim_split_prefill_padding_noncausal() -> None:
    """head_dim 48 (3 groups, padded tiles), GQA 3 (BLOCK_Q 5), splits on a prefill batch,
    padding query tokens past query_start_loc[-1], and a non-causal variant."""
    gen = torch.Generator().manual_seed(48)
    _run_attention(gen, 48, 2, 3, 16, [40, 18], [12, 18], torch.float32, split=True, padding_tokens=3)
    _run_attention(gen, 48, 2, 3, 16, [40, 18], [12, 18], torch.float32, causal=False)


@pytest.mark.parametrize("layout_name", list(SCHEME_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dtype_id)
def test_attention_scheme_layouts(layout_name: str, dtype: torch.dtype) -> None:
    """Decode, chunked prefill and prefill in one batch, GQA 4, with split-K, on each scheme layout."""
    gen = torch.Generator().manual_seed(len(layout_name))
    layout = SCHEME_LAYOUTS[layout_name]
    _run_attention(gen, 64, 2, 4, 16, [37, 40, 20, 1], [1, 7, 20, 1], dtype, split=True, layout=layout)
    _run_attention(gen, 64, 2, 4, 16, [37, 40, 20, 1], [1, 7, 20, 1], dtype, layout=layout)


# ---------------------------------------------------------------- bad input


class _NoLaunch:
    """Stands in for a kernel: indexing it (a launch) fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("kernel launched despite invalid input")


@pytest.fixture()
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_store, "_store_kv_nf4_kernel", _NoLaunch())
    monkeypatch.setattr(triton_load, "_load_kv_nf4_kernel", _NoLaunch())
    monkeypatch.setattr(triton_attention, "_nf4_attention_kernel", _NoLaunch())
    monkeypatch.setattr(triton_attention, "_nf4_attention_merge_kernel", _NoLaunch())


def _inputs(head_dim: int = 64) -> dict:
    layout = format_for("nf4", head_dim)
    return {
        "layout": layout,
        "cache": torch.zeros(2, 2, 16, layout.cell_bytes, dtype=torch.uint8, device=DEVICE),
        "kv": torch.zeros(3, 2, head_dim, device=DEVICE),
        "slots": torch.arange(3, device=DEVICE),
        "query": torch.zeros(2, 4, head_dim, device=DEVICE),
        "table": torch.zeros(2, 2, dtype=torch.int32, device=DEVICE),
        "qsl": torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE),
        "seq_lens": torch.tensor([3, 5], dtype=torch.int32, device=DEVICE),
    }


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda d: d.update(cache=d["cache"].to(torch.int8)), ValueError, "must be uint8"),
        (lambda d: d.update(cache=d["cache"][..., :-1]), ValueError, "must be uint8"),
        (lambda d: d.update(kv=d["kv"].to(torch.float64)), TypeError, "float32, float16 or bfloat16"),
        (lambda d: d.update(kv=d["kv"].to(torch.int32)), TypeError, "float32, float16 or bfloat16"),
        (lambda d: d.update(kv=d["kv"][..., :32]), ValueError, "head_dim"),
        (lambda d: d.update(kv=d["kv"][:, :1]), ValueError, "num_kv_heads|KV heads"),
        (lambda d: d.update(slots=d["slots"].float()), TypeError, "slot_mapping"),
        (lambda d: d.update(slots=torch.arange(5, device=DEVICE)), ValueError, "slots"),
    ],
)
def test_store_rejects_bad_input_before_launch(no_launch, change, error, match) -> None:
    d = _inputs()
    change(d)
    with pytest.raises(error, match=match):
        store_kv_nf4(d["cache"], d["kv"], d["kv"], d["slots"], d["layout"])


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda d: d.update(query=d["query"].to(torch.float64)), TypeError, "query must be"),
        (lambda d: d.update(query=torch.zeros(2, 3, 64, device=DEVICE)), ValueError, "multiple of"),
        (lambda d: d.update(query=d["query"][..., :32]), ValueError, "query must be"),
        (lambda d: d.update(table=d["table"].float()), TypeError, "block_table"),
        (lambda d: d.update(qsl=d["qsl"][:2]), TypeError, "query_start_loc"),
        (lambda d: d.update(seq_lens=d["seq_lens"].float()), TypeError, "seq_lens"),
        (lambda d: d.update(scale=0.0), ValueError, "softmax_scale"),
        (lambda d: d.update(cache=d["cache"].to(torch.bfloat16)), ValueError, "must be uint8"),
    ],
)
def test_attention_rejects_bad_input_before_launch(no_launch, change, error, match) -> None:
    d = _inputs()
    d["scale"] = 0.125
    change(d)
    with pytest.raises(error, match=match):
        nf4_paged_attention(
            d["query"], d["cache"], d["table"], d["qsl"], d["seq_lens"], d["layout"], d["scale"]
        )


def test_calibration_tables_are_checked_before_launch(no_launch) -> None:
    d = _inputs()
    wrong = torch.ones(2, 32, device=DEVICE)  # head_dim 32, not 64
    with pytest.raises(ValueError, match=r"key_scale must be a contiguous float32 \[2, 64\]"):
        store_kv_nf4(d["cache"], d["kv"], d["kv"], d["slots"], d["layout"], key_scale=wrong)
    with pytest.raises(ValueError, match="value_offset must be"):
        store_kv_nf4(d["cache"], d["kv"], d["kv"], d["slots"], d["layout"], value_offset=wrong.double())
    with pytest.raises(ValueError, match="prepared rows"):
        ones = torch.ones(2, 64, device=DEVICE)
        store_kv_nf4(d["cache"], d["kv"], d["kv"], d["slots"], d["layout"], key_scale=ones, prepared=True)
    with pytest.raises(ValueError, match=r"query_scale must be a contiguous float32 \[4, 64\]"):
        nf4_paged_attention(
            d["query"], d["cache"], d["table"], d["qsl"], d["seq_lens"], d["layout"], 0.125, query_scale=wrong
        )
    with pytest.raises(ValueError, match="chunk_tokens"):
        nf4_paged_attention(d["query"], d["cache"], d["table"], d["qsl"], d["seq_lens"], d["layout"], 0.125,
                            chunk_tokens=100)


def test_load_rejects_bad_input_before_launch(no_launch) -> None:
    d = _inputs()
    with pytest.raises(TypeError, match="out_dtype"):
        load_kv_nf4(d["cache"], d["table"], d["seq_lens"], d["layout"], out_dtype=torch.float64)
    with pytest.raises(TypeError, match="seq_lens"):
        load_kv_nf4(d["cache"], d["table"], d["seq_lens"][:1], d["layout"])
    with pytest.raises(ValueError, match="capacity"):
        load_kv_nf4(d["cache"], d["table"], d["seq_lens"], d["layout"], max_seq_len=33)


# ---------------------------------------------------------------- compiled for the GPU


@pytest.mark.skipif(not INTERPRET, reason="compiled for real on this CUDA machine by the tests above")
def test_kernels_compile_for_sm90() -> None:
    """The interpreter skips the compiler: build every kernel for sm_90 (ptxas from the Triton
    wheel, no GPU needed) in a fresh process without TRITON_INTERPRET, and check the store/load
    PTX has no contracted FMA or approximate division (see tests/compile_check.py)."""
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton build ships no NVIDIA ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("compile_check.py")), "--arch", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stdout + result.stderr
