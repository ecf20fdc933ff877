"""Fused paged attention over the NF4 cache: decode, prefill and chunked prefill.

Pages are read directly: each K/V tile is unpacked (nibbles, and scales in the row's scheme:
a ue5m3 byte per group, or a ue5m3 row code times a ladder rung per group) and dequantized in
registers; no bf16 copy of the cache is ever written.

Rotation: **queries come in rotated and the output leaves rotated.** The cache
holds ``k @ R`` and ``v @ R`` (:mod:`vllm_nf4kv.rotation`); since ``R`` is
orthogonal, ``softmax((q R)(k R)^T) (v R) = softmax(q k^T) v R``, so the caller
passes ``rotate(q)`` and applies ``unrotate`` (``@ R^T``) to the result. Keeping
the two small matmuls outside lets vLLM fuse them with the projections later.

Design (one kernel for every batch mix, like vLLM's unified Triton attention):

* a program owns a *query tile* (``BLOCK_Q`` query tokens of one sequence times the
  ``QUERIES_PER_KV`` query heads that share one KV head, flattened into
  ``BLOCK_M >= 16`` rows) and one KV head, so each KV tile is dequantized once
  for the whole GQA group and both products run on tensor cores (``tl.dot``);
* query tiles are numbered ``query_start_loc[s] // BLOCK_Q + s`` onwards per
  sequence ``s`` (an upper bound known without a host sync); a program finds its
  sequence by binary search and exits when its tile is past the sequence's
  queries;
* keys are visited in ``TILE_N``-token tiles through the block table (one lookup per
  token, so any ``block_size`` works), with an online softmax in base 2;
* causal: query ``i`` of a sequence with ``q_len`` new tokens sits at position
  ``seq_len - q_len + i`` and sees keys ``0 .. that position``;
* split-K (``num_splits > 1``, for decode at long context): the program grid gets a
  third axis; split ``j`` covers the ``j``-th share of the sequence's key tiles
  and writes an unnormalized partial (acc, running max, running sum); a reduce
  kernel merges the splits. Shares are computed in the kernel from the actual
  ``seq_len``, so a fixed ``num_splits`` suits CUDA-graph capture.

Even/odd columns: a packed byte holds elements ``2j`` (high nibble) and ``2j + 1``
(low nibble). Rather than interleave registers, the kernel splits the query into
its even and odd columns, ``q k^T = q_even k_even^T + q_odd k_odd^T``, and keeps two
output accumulators written back to columns ``2j`` and ``2j + 1``.

Not supported (the backend must refuse them at selection time): sliding window,
logit soft-capping, ALiBi, attention sinks, encoder cross-attention.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_nf4kv.format import CellLayout
from vllm_nf4kv.kernels.triton_codec import (
    alignment,
    dequant_pairs,
    ladder_table,
    next_power_of_2,
    nf4_tables,
    relative_bits,
    require_scheme,
)
from vllm_nf4kv.reference import check_paged_cache

_QUERY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634

# Fixed launch heuristics (no autotune: its first-call benchmarking would stall the
# first forward pass). Not yet tuned on a GPU (docs/performance.md):
# * BLOCK_M = 16 rows (the smallest tl.dot M), or the GQA group if larger;
# * TILE_N = 64 keys per step; 32 at head_dim > 128 or with fp32 queries (whose
#   FMA-path dots spilled at 64 on sm_90): two dequantized [TILE_N, head_dim/2]
#   fp32 tiles live at once per K and V;
# * 4 warps; 2 pipeline stages (~80 KB shared memory at head_dim 128 on sm_90, so
#   2 programs per SM; 1 stage needs ~20 KB: the first knob to sweep,
#   `scripts/bench_kernels.py --num-stages`);
# * split-K only when every sequence has at most _SPLIT_MAX_QUERY_LEN queries
#   (decode, speculative decode): enough splits to give each SM a few programs,
#   at most _MAX_SPLITS, and no split shorter than _MIN_SPLIT_TOKENS keys.
_TILE_N = 64
_TILE_N_SMALL = 32
_NUM_WARPS = 4
_NUM_STAGES = 2
_SPLIT_MAX_QUERY_LEN = 8
_MAX_SPLITS = 16
_MIN_SPLIT_TOKENS = 256
_PROGRAMS_PER_SM = 4
_DEFAULT_NUM_SMS = 132  # H200 / H100 SXM, when no CUDA device is queried (interpreter)


@triton.jit
def _find_seq(query_start_loc_ptr, q_tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Last sequence whose first query tile (``query_start_loc[s] // BLOCK_Q + s``) is <= ``q_tile``."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= q_tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _nf4_attention_kernel(
    query_ptr,  # [num_tokens, num_q_heads, head_dim] fp32/fp16/bf16, rotated
    cache_ptr,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8
    block_table_ptr,  # [num_seqs, max_blocks_per_seq] int32/int64
    query_start_loc_ptr,  # [num_seqs + 1] int32/int64
    seq_lens_ptr,  # [num_seqs] int32/int64: keys per sequence, new queries included
    levels_ptr,  # [NUM_LEVELS] fp32
    k_ladder_ptr,  # fp32 relative ladder of the K rows (unread for per-group rows)
    v_ladder_ptr,  # fp32 relative ladder of the V rows (unread for per-group rows)
    out_ptr,  # NUM_SPLITS == 1: [num_tokens, num_q_heads, head_dim]; else fp32 partial acc
    #           [num_tokens, num_q_heads, NUM_SPLITS, head_dim]
    max_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS] fp32 running max (log2 units); unused if 1 split
    sum_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS] fp32 running sum; unused if 1 split
    scale_log2,  # softmax_scale * log2(e)
    num_seqs,
    stride_q_tok: tl.int64,
    stride_q_head: tl.int64,
    stride_c_block: tl.int64,
    stride_c_head: tl.int64,
    stride_c_tok: tl.int64,
    stride_bt_seq: tl.int64,
    stride_o_tok: tl.int64,
    stride_o_head: tl.int64,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
    VALUE_OFFSET: tl.constexpr,
    K_GROUP: tl.constexpr,
    K_SCALE_OFFSET: tl.constexpr,
    K_RELATIVE_BITS: tl.constexpr,  # triton_codec.relative_bits: 0 per-group ue5m3, B two-level
    V_GROUP: tl.constexpr,
    V_SCALE_OFFSET: tl.constexpr,
    V_RELATIVE_BITS: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    CAUSAL: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    q_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_seq(query_start_loc_ptr, q_tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_tile = q_tile - (q_start // BLOCK_Q + seq)
    if local_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    # rows: (query token, query head of this KV head's group), flattened
    rows = tl.arange(0, BLOCK_M)
    q_pos = local_tile * BLOCK_Q + rows // QUERIES_PER_KV  # [BLOCK_M] index among the sequence's queries
    head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV  # [BLOCK_M]
    row_ok = (q_pos < q_len) & (rows < BLOCK_Q * QUERIES_PER_KV)
    token = (q_start + q_pos).to(tl.int64)
    cols = tl.arange(0, HALF_PAD)
    q_mask = row_ok[:, None] & (cols < HEAD_DIM // 2)[None, :]
    q_rows = token * stride_q_tok + head.to(tl.int64) * stride_q_head  # [BLOCK_M]
    q_ptrs = query_ptr + q_rows[:, None] + 2 * cols[None, :]
    q_even = tl.load(q_ptrs, mask=q_mask, other=0.0).to(tl.float32).to(DOT_DTYPE)  # [BLOCK_M, HALF_PAD]
    q_odd = tl.load(q_ptrs + 1, mask=q_mask, other=0.0).to(tl.float32).to(DOT_DTYPE)

    # keys this query tile can see, and this split's share of their tiles
    if CAUSAL:
        kv_len = tl.minimum(seq_len, context_len + (local_tile + 1) * BLOCK_Q)
    else:
        kv_len = seq_len
    num_tiles = tl.cdiv(kv_len, TILE_N)
    if NUM_SPLITS == 1:
        tile_lo = 0
        tile_hi = num_tiles
    else:
        per_split = tl.cdiv(num_tiles, NUM_SPLITS)
        tile_lo = tl.minimum(split * per_split, num_tiles)
        tile_hi = tl.minimum(tile_lo + per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_even = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    acc_odd = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    q_abs = context_len + q_pos  # [BLOCK_M] absolute position of each row's query
    bt_ptr = block_table_ptr + seq.to(tl.int64) * stride_bt_seq
    for tile in range(tile_lo, tile_hi):
        pos = tile * TILE_N + tl.arange(0, TILE_N)  # [TILE_N] key positions
        pos_ok = pos < kv_len
        block = tl.load(bt_ptr + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        cell = (
            block * stride_c_block
            + kv_head.to(tl.int64) * stride_c_head
            + (pos % BLOCK_SIZE).to(tl.int64) * stride_c_tok
        )
        cell = tl.multiple_of(cell, ROW_ALIGN)
        k_even, k_odd = dequant_pairs(
            cache_ptr + cell,
            pos_ok,
            levels_ptr,
            k_ladder_ptr,
            HEAD_DIM,
            K_GROUP,
            K_SCALE_OFFSET,
            K_RELATIVE_BITS,
            HALF_PAD,
        )
        s = tl.dot(q_even, tl.trans(k_even.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
        s = tl.dot(q_odd, tl.trans(k_odd.to(DOT_DTYPE)), s, input_precision=DOT_PRECISION)
        s = s * scale_log2  # [BLOCK_M, TILE_N]
        visible = row_ok[:, None] & pos_ok[None, :]
        if CAUSAL:
            visible = visible & (pos[None, :] <= q_abs[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # rows with nothing visible yet
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        v_even, v_odd = dequant_pairs(
            cache_ptr + VALUE_OFFSET + cell,
            pos_ok,
            levels_ptr,
            v_ladder_ptr,
            HEAD_DIM,
            V_GROUP,
            V_SCALE_OFFSET,
            V_RELATIVE_BITS,
            HALF_PAD,
        )
        p = p.to(DOT_DTYPE)
        acc_even = tl.dot(p, v_even.to(DOT_DTYPE), acc_even * alpha[:, None], input_precision=DOT_PRECISION)
        acc_odd = tl.dot(p, v_odd.to(DOT_DTYPE), acc_odd * alpha[:, None], input_precision=DOT_PRECISION)

    out_cols = 2 * cols[None, :]
    if NUM_SPLITS == 1:
        inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
        o_ptrs = out_ptr + (token * stride_o_tok + head.to(tl.int64) * stride_o_head)[:, None] + out_cols
        tl.store(o_ptrs, (acc_even * inv[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)
        tl.store(o_ptrs + 1, (acc_odd * inv[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        stat = (token * stride_o_tok + head.to(tl.int64) * stride_o_head) * NUM_SPLITS + split  # [BLOCK_M]
        tl.store(max_ptr + stat, m_i, mask=row_ok)
        tl.store(sum_ptr + stat, l_i, mask=row_ok)
        o_ptrs = out_ptr + (stat * HEAD_DIM)[:, None] + out_cols
        tl.store(o_ptrs, acc_even, mask=q_mask)
        tl.store(o_ptrs + 1, acc_odd, mask=q_mask)


@triton.jit
def _nf4_attention_reduce_kernel(
    out_ptr,  # [num_tokens, num_q_heads, head_dim]
    acc_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS, head_dim] fp32
    max_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS] fp32
    sum_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS] fp32
    query_start_loc_ptr,  # [num_seqs + 1]
    num_seqs,
    num_q_heads,
    stride_o_tok: tl.int64,
    stride_o_head: tl.int64,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    if token >= tl.load(query_start_loc_ptr + num_seqs):
        return  # padding tokens past the last sequence: no partials were written
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    stat = (token * num_q_heads + head) * NUM_SPLITS
    m = tl.load(max_ptr + stat + splits, mask=split_ok, other=float("-inf"))  # [SPLITS_PAD]
    l_s = tl.load(sum_ptr + stat + splits, mask=split_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_ref = tl.where(m_max > float("-inf"), m_max, 0.0)
    w = tl.exp2(m - m_ref)  # empty splits: exp2(-inf) = 0
    total = tl.sum(l_s * w, axis=0)
    d = tl.arange(0, HEAD_PAD)
    acc = tl.load(
        acc_ptr + (stat + splits)[:, None] * HEAD_DIM + d[None, :],
        mask=split_ok[:, None] & (d < HEAD_DIM)[None, :],
        other=0.0,
    )  # [SPLITS_PAD, HEAD_PAD]
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + token * stride_o_tok + head * stride_o_head + d,
        out.to(out_ptr.dtype.element_ty),
        mask=d < HEAD_DIM,
    )


# Whether @triton.jit built interpreted kernels (TRITON_INTERPRET=1 when this module
# was imported); read from the kernel itself, not from the environment at call time.
_INTERPRETED = not isinstance(_nf4_attention_kernel, triton.runtime.jit.JITFunction)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_NUM_SMS


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int | None, device: torch.device
) -> int:
    """Split-K factor of the fixed heuristic (see the module's launch notes)."""
    if max_query_len > _SPLIT_MAX_QUERY_LEN or num_seqs == 0:
        return 1
    wanted = triton.cdiv(_PROGRAMS_PER_SM * _num_sms(device), num_seqs * num_kv_heads)
    if max_seq_len is not None:
        wanted = min(wanted, triton.cdiv(max_seq_len, _MIN_SPLIT_TOKENS))
    return max(1, min(_MAX_SPLITS, wanted))


def _dot_types(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """tl.dot operand type and precision for a query dtype.

    bf16/fp16 queries: tensor-core dots in that type (K/V tiles rounded to it, fp32
    accumulation). fp32 queries: full fp32 ("ieee", no TF32). Under the Triton
    interpreter bf16 dots run in fp32 because its numpy ``tl.dot`` multiplies the
    raw bf16 bit patterns as integers.
    """
    if dtype == torch.float16:
        return tl.float16, "tf32"
    if dtype == torch.bfloat16 and not _INTERPRETED:
        return tl.bfloat16, "tf32"
    return tl.float32, "ieee"


def nf4_paged_attention(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_dim] fp32/fp16/bf16, rotated (q @ R)
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32/int64
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32/int64 (cu_seqlens_q)
    seq_lens: torch.Tensor,  # [num_seqs] int32/int64, keys per sequence incl. the new queries
    layout: CellLayout,
    softmax_scale: float,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    causal: bool = True,
    num_splits: int | None = None,
    output: torch.Tensor | None = None,  # [num_tokens, num_q_heads, head_dim], query's dtype
) -> torch.Tensor:
    """Attention of rotated queries over the NF4 paged cache; returns the *rotated* output.

    ``max_query_len`` / ``max_seq_len`` (host ints, as vLLM's metadata has them) only
    steer the split-K heuristic; without ``max_query_len`` one host sync reads it.
    ``num_splits`` overrides the heuristic (fix it for CUDA-graph capture). Query
    tokens past ``query_start_loc[-1]`` (padding) are left unwritten.
    """
    check_paged_cache(kv_cache, layout)
    require_scheme(layout)
    if kv_cache.stride(-1) != 1:
        raise ValueError(
            f"kv_cache cells must be contiguous (stride 1 in the last dim), got {kv_cache.stride()}"
        )
    num_kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    if query.dtype not in _QUERY_DTYPES:
        raise TypeError(f"query must be float32, float16 or bfloat16, got {query.dtype}")
    if query.dim() != 3 or query.shape[2] != layout.head_dim or query.stride(-1) != 1:
        raise ValueError(
            f"query must be [num_tokens, num_q_heads, {layout.head_dim}] with contiguous "
            f"head vectors, got {tuple(query.shape)} stride {query.stride()}"
        )
    num_tokens, num_q_heads = query.shape[:2]
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads={num_q_heads} must be a multiple of the cache's num_kv_heads={num_kv_heads}"
        )
    if (
        block_table.dtype not in (torch.int32, torch.int64)
        or block_table.dim() != 2
        or block_table.stride(-1) != 1
    ):
        raise TypeError(
            f"block_table must be a row-contiguous 2-D int32/int64 tensor, got "
            f"{block_table.dtype} {tuple(block_table.shape)}"
        )
    num_seqs = block_table.shape[0]
    if query_start_loc.dtype not in (torch.int32, torch.int64) or query_start_loc.shape != (num_seqs + 1,):
        raise TypeError(
            f"query_start_loc must be int32/int64 [{num_seqs + 1}] (num_seqs + 1), got "
            f"{query_start_loc.dtype} {tuple(query_start_loc.shape)}"
        )
    if seq_lens.dtype not in (torch.int32, torch.int64) or seq_lens.shape != (num_seqs,):
        raise TypeError(
            f"seq_lens must be int32/int64 [{num_seqs}], got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )
    if not softmax_scale > 0 or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale}")
    for name, t in (
        ("query", query),
        ("block_table", block_table),
        ("query_start_loc", query_start_loc),
        ("seq_lens", seq_lens),
    ):
        if t.device != kv_cache.device:
            raise ValueError(f"{name} is on {t.device} but kv_cache is on {kv_cache.device}")
    if output is None:
        output = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    elif (
        output.shape != query.shape
        or output.dtype not in _QUERY_DTYPES
        or output.stride(-1) != 1
        or output.device != query.device
    ):
        raise ValueError(
            f"output must be a {tuple(query.shape)} float tensor on {query.device} with "
            f"contiguous head vectors, got {output.dtype} {tuple(output.shape)}"
        )
    if num_tokens == 0 or num_seqs == 0:
        return output

    queries_per_kv = num_q_heads // num_kv_heads
    block_m = max(16, next_power_of_2(queries_per_kv))
    block_q = block_m // queries_per_kv
    head_dim = layout.head_dim
    tile_n = _TILE_N if head_dim <= 128 and query.dtype != torch.float32 else _TILE_N_SMALL
    if num_splits is None:
        if max_query_len is None:
            max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_query_len, max_seq_len, kv_cache.device)
    if not 1 <= num_splits <= 256:
        raise ValueError(f"num_splits must be in [1, 256], got {num_splits}")
    dot_dtype, dot_precision = _dot_types(query.dtype)
    levels, _ = nf4_tables(kv_cache.device)
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, num_splits)
    common = dict(
        QUERIES_PER_KV=queries_per_kv,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        TILE_N=tile_n,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        HALF_PAD=max(16, next_power_of_2(head_dim // 2)),
        VALUE_OFFSET=layout.value_offset,
        K_GROUP=layout.key.group_size,
        K_SCALE_OFFSET=layout.key.scale_offset,
        K_RELATIVE_BITS=relative_bits(layout.key),
        V_GROUP=layout.value.group_size,
        V_SCALE_OFFSET=layout.value.scale_offset,
        V_RELATIVE_BITS=relative_bits(layout.value),
        ROW_ALIGN=alignment(*kv_cache.stride()[:3]),
        CAUSAL=causal,
        NUM_SPLITS=num_splits,
        DOT_DTYPE=dot_dtype,
        DOT_PRECISION=dot_precision,
        num_warps=_NUM_WARPS,
        num_stages=_NUM_STAGES,
        enable_fp_fusion=True,
    )
    ladders = ladder_table(layout.key, kv_cache.device), ladder_table(layout.value, kv_cache.device)
    args = (query, kv_cache, block_table, query_start_loc, seq_lens, levels, *ladders)
    strides = (*query.stride()[:2], *kv_cache.stride()[:3], block_table.stride(0))
    scale_log2 = softmax_scale * _LOG2E
    if num_splits == 1:
        _nf4_attention_kernel[grid](
            *args, output, output, output, scale_log2, num_seqs, *strides, *output.stride()[:2], **common
        )
        return output
    acc = torch.empty(
        (num_tokens, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=query.device
    )
    stats = torch.empty((2, num_tokens, num_q_heads, num_splits), dtype=torch.float32, device=query.device)
    _nf4_attention_kernel[grid](
        *args, acc, stats[0], stats[1], scale_log2, num_seqs, *strides, num_q_heads, 1, **common
    )
    _nf4_attention_reduce_kernel[(num_tokens, num_q_heads)](
        output,
        acc,
        stats[0],
        stats[1],
        query_start_loc,
        num_seqs,
        num_q_heads,
        *output.stride()[:2],
        HEAD_DIM=head_dim,
        HEAD_PAD=next_power_of_2(head_dim),
        NUM_SPLITS=num_splits,
        SPLITS_PAD=next_power_of_2(num_splits),
        num_warps=_NUM_WARPS,
        enable_fp_fusion=True,
    )
    return output
