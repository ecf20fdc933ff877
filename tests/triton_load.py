"""``load_kv_nf4``: the paged NF4 cache read back into rotated K/V, for tests and checks only.

No serving path reads K/V out of the cache (attention dequantizes tiles in registers,
:mod:`vllm_nf4kv.kernels.triton_attention`), so this gather lives with the tests rather
than in the package: ``tests/test_triton_kernels.py`` compares it with the reference, and
``scripts/bench_kernels.py --check-only`` and ``tests/compile_check.py`` load this file by
path to check it on a GPU and compile it for sm_90.

``load_kv_nf4`` reads sequences through their block tables into rotated fp32 (or
fp16/bf16, rounded to nearest even) K/V; in fp32 it equals
:func:`vllm_nf4kv.reference.read_paged` exactly. It decodes with the kernels' own helpers
(:func:`vllm_nf4kv.kernels.triton_codec.dequant_pairs`) and checks its cache like the store.

Import it in the Triton mode of the kernels (under ``TRITON_INTERPRET=1`` on a machine
without CUDA): ``tests/triton_interpreted.py`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_nf4kv.format import CellLayout
from vllm_nf4kv.kernels.triton_codec import (
    alignment,
    cell_reader_constexprs,
    dequant_pairs,
    fp32_to_bf16_bits,
    ladder_table,
    next_power_of_2,
    nf4_tables,
)
from vllm_nf4kv.kernels.triton_store import _check_cache, _check_device

_OUT_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# 32-token tiles and 4 warps, a plain streaming copy (64-token tiles spilled at head_dim 128).
_LOAD_TILE_N = 32
_LOAD_NUM_WARPS = 4


@triton.jit
def _store_pairs(out_ptrs, stride_d, even, odd, mask, HALF_PAD: tl.constexpr, OUT_KIND: tl.constexpr):
    """Write even/odd tiles to columns 2j / 2j+1 as fp32 (0), fp16 (1) or bf16 bits (2)."""
    j = tl.arange(0, HALF_PAD)[None, :]
    ptrs_even = out_ptrs[:, None] + (2 * j) * stride_d
    if OUT_KIND == 2:
        tl.store(ptrs_even, fp32_to_bf16_bits(even), mask=mask)
        tl.store(ptrs_even + stride_d, fp32_to_bf16_bits(odd), mask=mask)
    elif OUT_KIND == 1:
        tl.store(ptrs_even, even.to(tl.float16), mask=mask)
        tl.store(ptrs_even + stride_d, odd.to(tl.float16), mask=mask)
    else:
        tl.store(ptrs_even, even, mask=mask)
        tl.store(ptrs_even + stride_d, odd, mask=mask)


@triton.jit
def _load_kv_nf4_kernel(
    cache_ptr,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8
    block_table_ptr,  # [num_seqs, max_blocks_per_seq] int32/int64
    seq_lens_ptr,  # [num_seqs] int32/int64
    levels_ptr,  # [NUM_LEVELS] fp32
    k_ladder_ptr,  # fp32 relative ladder of the K rows (unread for per-group rows)
    v_ladder_ptr,  # fp32 relative ladder of the V rows (unread for per-group rows)
    key_out_ptr,  # [num_seqs, max_seq_len, num_kv_heads, head_dim] fp32/fp16 (bf16 as int16)
    value_out_ptr,  # [num_seqs, max_seq_len, num_kv_heads, head_dim] like key_out
    max_seq_len,
    stride_c_block: tl.int64,
    stride_c_head: tl.int64,
    stride_c_tok: tl.int64,
    stride_bt_seq: tl.int64,
    stride_o_seq: tl.int64,
    stride_o_tok: tl.int64,
    stride_o_head: tl.int64,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    VALUE_OFFSET: tl.constexpr,
    K_GROUP: tl.constexpr,
    K_SCALE_OFFSET: tl.constexpr,
    K_RELATIVE_BITS: tl.constexpr,
    V_GROUP: tl.constexpr,
    V_SCALE_OFFSET: tl.constexpr,
    V_RELATIVE_BITS: tl.constexpr,
    HALF_PAD: tl.constexpr,
    TILE_N: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    OUT_KIND: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1) * TILE_N + tl.arange(0, TILE_N)  # [TILE_N]
    head = tl.program_id(2).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    valid = pos < seq_len
    block = tl.load(block_table_ptr + seq * stride_bt_seq + pos // BLOCK_SIZE, mask=valid, other=0)
    offset = (pos % BLOCK_SIZE).to(tl.int64)
    cell = block.to(tl.int64) * stride_c_block + head * stride_c_head + offset * stride_c_tok
    cell = tl.multiple_of(cell, ROW_ALIGN)
    out = seq * stride_o_seq + pos.to(tl.int64) * stride_o_tok + head * stride_o_head  # [TILE_N]
    mask = (pos < max_seq_len)[:, None] & (tl.arange(0, HALF_PAD)[None, :] < HEAD_DIM // 2)
    row_ok = valid[:, None]  # rows past seq_len are written as zeros
    k_even, k_odd = dequant_pairs(
        cache_ptr + cell,
        valid,
        levels_ptr,
        k_ladder_ptr,
        HEAD_DIM,
        K_GROUP,
        K_SCALE_OFFSET,
        K_RELATIVE_BITS,
        HALF_PAD,
    )
    _store_pairs(
        key_out_ptr + out,
        1,
        tl.where(row_ok, k_even, 0.0),
        tl.where(row_ok, k_odd, 0.0),
        mask,
        HALF_PAD,
        OUT_KIND,
    )
    v_even, v_odd = dequant_pairs(
        cache_ptr + VALUE_OFFSET + cell,
        valid,
        levels_ptr,
        v_ladder_ptr,
        HEAD_DIM,
        V_GROUP,
        V_SCALE_OFFSET,
        V_RELATIVE_BITS,
        HALF_PAD,
    )
    _store_pairs(
        value_out_ptr + out,
        1,
        tl.where(row_ok, v_even, 0.0),
        tl.where(row_ok, v_odd, 0.0),
        mask,
        HALF_PAD,
        OUT_KIND,
    )


def load_kv_nf4(
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32/int64
    seq_lens: torch.Tensor,  # [num_seqs] int32/int64
    layout: CellLayout,
    *,
    max_seq_len: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize sequences to rotated K, V ``[num_seqs, max_seq_len, num_kv_heads, head_dim]``.

    Row ``t`` of sequence ``i`` equals ``reference.read_paged(kv_cache, block_table[i],
    seq_lens[i], layout)[.][t]`` (exactly in fp32; fp16/bf16 round to nearest even);
    rows at or past ``seq_lens[i]`` are zero. ``max_seq_len`` defaults to
    ``seq_lens.max()`` (a host sync); pass it when known.
    """
    _check_cache(kv_cache, layout)
    if out_dtype not in _OUT_KINDS:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if block_table.dtype not in (torch.int32, torch.int64) or block_table.dim() != 2:
        raise TypeError(
            f"block_table must be 2-D int32/int64 [num_seqs, max_blocks_per_seq], got "
            f"{block_table.dtype} {tuple(block_table.shape)}"
        )
    if seq_lens.dtype not in (torch.int32, torch.int64) or seq_lens.shape != block_table.shape[:1]:
        raise TypeError(
            f"seq_lens must be int32/int64 [{block_table.shape[0]}] (one per block_table row), "
            f"got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )
    if block_table.stride(-1) != 1:
        raise ValueError("block_table rows must be contiguous")
    _check_device(kv_cache, block_table=block_table, seq_lens=seq_lens)
    num_seqs = block_table.shape[0]
    num_kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if num_seqs else 0
    if max_seq_len > block_table.shape[1] * block_size:
        raise ValueError(
            f"max_seq_len={max_seq_len} exceeds the block table's capacity "
            f"{block_table.shape[1]} x {block_size}"
        )
    shape = (num_seqs, max_seq_len, num_kv_heads, layout.head_dim)
    key = torch.empty(shape, dtype=out_dtype, device=kv_cache.device)
    value = torch.empty(shape, dtype=out_dtype, device=kv_cache.device)
    if key.numel() == 0:
        return key, value
    key_out, value_out = (
        (key.view(torch.int16), value.view(torch.int16)) if out_dtype == torch.bfloat16 else (key, value)
    )
    levels, _ = nf4_tables(kv_cache.device)
    ladders = ladder_table(layout.key, kv_cache.device), ladder_table(layout.value, kv_cache.device)
    grid = (num_seqs, triton.cdiv(max_seq_len, _LOAD_TILE_N), num_kv_heads)
    _load_kv_nf4_kernel[grid](
        kv_cache,
        block_table,
        seq_lens,
        levels,
        *ladders,
        key_out,
        value_out,
        max_seq_len,
        *kv_cache.stride()[:3],
        block_table.stride(0),
        *key.stride()[:3],
        BLOCK_SIZE=block_size,
        HEAD_DIM=layout.head_dim,
        **cell_reader_constexprs(layout),
        HALF_PAD=next_power_of_2(layout.head_dim // 2),
        TILE_N=_LOAD_TILE_N,
        ROW_ALIGN=alignment(*kv_cache.stride()[:3]),
        OUT_KIND=_OUT_KINDS[out_dtype],
        num_warps=_LOAD_NUM_WARPS,
        enable_fp_fusion=False,  # level * scale must round like torch
    )
    return key, value
