"""Fused paged attention over the NF4 cache: decode, prefill and chunked prefill.

Pages are read directly: each K/V tile is unpacked (nibbles, and scales in the row's scheme:
a ue5m3 byte per group, or a ue5m3 row code times a ladder rung per group) and dequantized in
registers; no bf16 copy of the cache is ever written.

**Queries come in and outputs leave in model space.** The cache holds ``k R`` and ``v R``
(:mod:`vllm_nf4kv.rotation`); since ``R`` is orthogonal, ``softmax((q R)(k R)^T) (v R) =
softmax(q k^T) v R``. The prologue applies the calibration's ``q / d`` (as ``q * (1 / d)``)
and rotates each query row, the epilogue un-rotates the output and adds the calibration's
``mu``, both with the reference's fp64 butterflies
(:mod:`vllm_nf4kv.kernels.triton_rotation`): nothing runs between vLLM and the kernels.

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
  ``seq_len - q_len + i`` and sees keys ``0 .. that position``.

Batch invariance by construction: the keys are cut into *chunks* of ``CHUNK_TILES`` tiles
at fixed positions (a model-level constant, never a function of the batch). Each chunk
runs its own online softmax from scratch, and chunks are merged in order
(:func:`_merge`, ``enable_fp_fusion=False`` so every product rounds alone). A program
either walks all its chunks and merges as it goes, or (split-K, for decode batches: the
host picks it from the batch's shape) one program per chunk writes the chunk's state and
a second kernel merges them in the same order with the same operations. Either way a
query's output is the same fixed expression of its own sequence: the same bits alone, in
a mixed batch, split or not, and when a prefix-cache hit leaves it the only new token
(tiles and chunks past a row's causal limit change nothing: they add exact zeros).

Even/odd columns: a packed byte holds elements ``2j`` (high nibble) and ``2j + 1``
(low nibble). Rather than interleave registers, the kernel splits the query into
its even and odd columns, ``q k^T = q_even k_even^T + q_odd k_odd^T``, and keeps two
output accumulators, joined back into one row for the epilogue.

CUDA graphs: grids, constexprs and the split workspace depend on tensor shapes and the
host-known ``max_query_len`` only; there is no host sync, no ``.item()`` and no allocation
that depends on data.

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
    check_head_table,
    dequant_pairs,
    ladder_table,
    next_power_of_2,
    nf4_tables,
    relative_bits,
    require_scheme,
)
from vllm_nf4kv.kernels.triton_rotation import (
    rotate_rows,
    rotation_constexprs,
    rotation_table,
    unrotate_rows,
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
# * chunks: DEFAULT_CHUNK_TOKENS keys, or more so that the longest sequence the engine
#   serves has at most MAX_CHUNKS (chunk_plan);
# * split-K only when every sequence has at most SPLIT_MAX_QUERY_LEN queries (decode,
#   speculative decode), the batch leaves SMs idle (fewer than _PROGRAMS_PER_SM
#   programs a SM without it) and the chunk states fit SPLIT_WORKSPACE_BYTES (query
#   tokens x query heads x chunks x head_dim fp32, allocated per call). The choice never
#   changes a bit of the output, so it may follow the batch.
_TILE_N = 64
_TILE_N_SMALL = 32
_NUM_WARPS = 4
_NUM_STAGES = 2
DEFAULT_CHUNK_TOKENS = 512
MAX_CHUNKS = 64
SPLIT_MAX_QUERY_LEN = 8
SPLIT_WORKSPACE_BYTES = 32 << 20
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
def _merge(m_run, l_run, acc_even, acc_odd, m_c, l_c, c_even, c_odd):
    """Fold one chunk's softmax state into the running one (the same operations in both kernels)."""
    m_new = tl.maximum(m_run, m_c)
    m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # rows with nothing visible yet
    a = tl.exp2(m_run - m_ref)
    b = tl.exp2(m_c - m_ref)
    l_new = l_run * a + l_c * b
    acc_even = acc_even * a[:, None] + c_even * b[:, None]
    acc_odd = acc_odd * a[:, None] + c_odd * b[:, None]
    return m_new, l_new, acc_even, acc_odd


@triton.jit
def _chunk_state(
    q_even,
    q_odd,
    cache_ptr,
    bt_ptr,
    levels_ptr,
    k_ladder_ptr,
    v_ladder_ptr,
    chunk,
    num_tiles,
    kv_len,
    kv_head,
    q_abs,
    row_ok,
    scale_log2,
    stride_c_block,
    stride_c_head,
    stride_c_tok,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    CHUNK_TILES: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
    VALUE_OFFSET: tl.constexpr,
    K_GROUP: tl.constexpr,
    K_SCALE_OFFSET: tl.constexpr,
    K_RELATIVE_BITS: tl.constexpr,
    V_GROUP: tl.constexpr,
    V_SCALE_OFFSET: tl.constexpr,
    V_RELATIVE_BITS: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over one chunk's key tiles, from scratch: (max, sum, acc_even, acc_odd)."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_even = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    acc_odd = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    tile_hi = tl.minimum((chunk + 1) * CHUNK_TILES, num_tiles)
    for tile in range(chunk * CHUNK_TILES, tile_hi):
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
    return m_i, l_i, acc_even, acc_odd


@triton.jit
def _finish_rows(
    out_rot,  # [BLOCK_M, D_PAD] fp32 normalized output, rotated space
    out_ptr,
    token,  # [BLOCK_M] int64
    head,  # [BLOCK_M]
    row_ok,  # [BLOCK_M]
    rotation_ptr,
    output_offset_ptr,
    stride_o_tok,
    stride_o_head,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    STAGES: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    HAS_OUTPUT_OFFSET: tl.constexpr,
):
    """The epilogue: un-rotate, add the calibration's ``mu``, store in the output's dtype."""
    cols = tl.arange(0, D_PAD)[None, :]
    mask = row_ok[:, None] & (cols < HEAD_DIM)
    out = unrotate_rows(out_rot, rotation_ptr, BLOCK_M, D_PAD, STAGES, ONE_BLOCK)
    if HAS_OUTPUT_OFFSET:
        offsets = output_offset_ptr + head.to(tl.int64)[:, None] * HEAD_DIM + cols
        out = out + tl.load(offsets, mask=mask, other=0.0)
    o_ptrs = out_ptr + (token * stride_o_tok + head.to(tl.int64) * stride_o_head)[:, None] + cols
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _query_tile(query_start_loc_ptr, seq_lens_ptr, num_seqs, BLOCK_Q: tl.constexpr, CAUSAL: tl.constexpr):
    """This program's sequence, tile and key range (``valid`` False: past the sequence's queries)."""
    q_tile = tl.program_id(0)
    seq = _find_seq(query_start_loc_ptr, q_tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_tile = q_tile - (q_start // BLOCK_Q + seq)
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len
    if CAUSAL:  # keys this query tile can see
        kv_len = tl.minimum(seq_len, context_len + (local_tile + 1) * BLOCK_Q)
    else:
        kv_len = seq_len
    return seq, q_start, q_len, local_tile, context_len, kv_len, local_tile * BLOCK_Q < q_len


@triton.jit
def _tile_rows(
    local_tile, q_start, q_len, kv_head,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, QUERIES_PER_KV: tl.constexpr,
):  # fmt: skip
    """rows: (query token, query head of this KV head's group), flattened: q_pos, token, head, row_ok."""
    rows = tl.arange(0, BLOCK_M)
    q_pos = local_tile * BLOCK_Q + rows // QUERIES_PER_KV  # [BLOCK_M] index among the sequence's queries
    head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV  # [BLOCK_M]
    row_ok = (q_pos < q_len) & (rows < BLOCK_Q * QUERIES_PER_KV)
    return q_pos, (q_start + q_pos).to(tl.int64), head, row_ok


@triton.jit
def _nf4_attention_kernel(
    query_ptr,  # [num_tokens, num_q_heads, head_dim] fp32/fp16/bf16, model space
    cache_ptr,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8
    block_table_ptr,  # [num_seqs, max_blocks_per_seq] int32/int64
    query_start_loc_ptr,  # [num_seqs + 1] int32/int64
    seq_lens_ptr,  # [num_seqs] int32/int64: keys per sequence, new queries included
    levels_ptr,  # [NUM_LEVELS] fp32
    k_ladder_ptr,  # fp32 relative ladder of the K rows (unread for per-group rows)
    v_ladder_ptr,  # fp32 relative ladder of the V rows (unread for per-group rows)
    rotation_ptr,  # triton_rotation.rotation_table
    query_scale_ptr,  # [num_q_heads, head_dim] fp32 1 / d (unread without HAS_QUERY_SCALE)
    output_offset_ptr,  # [num_q_heads, head_dim] fp32 mu (unread without HAS_OUTPUT_OFFSET)
    out_ptr,  # [num_tokens, num_q_heads, head_dim], model space (unwritten when SPLIT)
    acc_ptr,  # SPLIT: [num_tokens, num_q_heads, max_chunks, head_dim] fp32 chunk accumulators
    max_ptr,  # SPLIT: [num_tokens, num_q_heads, max_chunks] fp32 chunk max (log2 units)
    sum_ptr,  # SPLIT: [num_tokens, num_q_heads, max_chunks] fp32 chunk sum
    scale_log2,  # softmax_scale * log2(e)
    num_seqs,
    num_q_heads,
    max_chunks,
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
    CHUNK_TILES: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    STAGES: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    VALUE_OFFSET: tl.constexpr,
    K_GROUP: tl.constexpr,
    K_SCALE_OFFSET: tl.constexpr,
    K_RELATIVE_BITS: tl.constexpr,  # triton_codec.relative_bits: 0 per-group ue5m3, B two-level
    V_GROUP: tl.constexpr,
    V_SCALE_OFFSET: tl.constexpr,
    V_RELATIVE_BITS: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    CAUSAL: tl.constexpr,
    SPLIT: tl.constexpr,  # one program per chunk (axis 2), states to acc/max/sum
    HAS_QUERY_SCALE: tl.constexpr,
    HAS_OUTPUT_OFFSET: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    HALF_PAD: tl.constexpr = D_PAD // 2
    kv_head = tl.program_id(1)
    seq, q_start, q_len, local_tile, context_len, kv_len, valid = _query_tile(
        query_start_loc_ptr, seq_lens_ptr, num_seqs, BLOCK_Q, CAUSAL
    )
    if not valid:
        return
    num_tiles = tl.cdiv(kv_len, TILE_N)
    num_chunks = tl.cdiv(num_tiles, CHUNK_TILES)
    if SPLIT:
        chunk_lo = tl.program_id(2)
        if chunk_lo >= num_chunks:
            return
        chunk_hi = chunk_lo + 1
    else:
        chunk_lo = 0
        chunk_hi = num_chunks
    q_pos, token, head, row_ok = _tile_rows(
        local_tile, q_start, q_len, kv_head, BLOCK_M, BLOCK_Q, QUERIES_PER_KV
    )

    # prologue: q / d, rotated (fp32), split into even and odd columns
    cols = tl.arange(0, D_PAD)[None, :]
    q_mask = row_ok[:, None] & (cols < HEAD_DIM)
    q_rows = token * stride_q_tok + head.to(tl.int64) * stride_q_head  # [BLOCK_M]
    q = tl.load(query_ptr + q_rows[:, None] + cols, mask=q_mask, other=0.0).to(tl.float32)
    if HAS_QUERY_SCALE:
        scales = query_scale_ptr + head.to(tl.int64)[:, None] * HEAD_DIM + cols
        q = q * tl.load(scales, mask=q_mask, other=0.0)
    q = rotate_rows(q, rotation_ptr, BLOCK_M, D_PAD, STAGES, ONE_BLOCK)
    q_even, q_odd = tl.split(tl.reshape(q, [BLOCK_M, HALF_PAD, 2]))
    q_even = q_even.to(DOT_DTYPE)
    q_odd = q_odd.to(DOT_DTYPE)

    m_run = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_even = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    acc_odd = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    q_abs = context_len + q_pos  # [BLOCK_M] absolute position of each row's query
    bt_ptr = block_table_ptr + seq.to(tl.int64) * stride_bt_seq
    for chunk in range(chunk_lo, chunk_hi):
        m_c, l_c, c_even, c_odd = _chunk_state(
            q_even, q_odd, cache_ptr, bt_ptr, levels_ptr, k_ladder_ptr, v_ladder_ptr,
            chunk, num_tiles, kv_len, kv_head, q_abs, row_ok, scale_log2,
            stride_c_block, stride_c_head, stride_c_tok,
            BLOCK_M, TILE_N, CHUNK_TILES, BLOCK_SIZE, HEAD_DIM, HALF_PAD, VALUE_OFFSET,
            K_GROUP, K_SCALE_OFFSET, K_RELATIVE_BITS, V_GROUP, V_SCALE_OFFSET, V_RELATIVE_BITS,
            ROW_ALIGN, CAUSAL, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip
        if SPLIT:
            m_run, l_run, acc_even, acc_odd = m_c, l_c, c_even, c_odd
        else:
            m_run, l_run, acc_even, acc_odd = _merge(m_run, l_run, acc_even, acc_odd, m_c, l_c, c_even, c_odd)

    acc = tl.reshape(tl.join(acc_even, acc_odd), [BLOCK_M, D_PAD])  # columns 2j, 2j + 1 again
    if SPLIT:
        stat = (token * num_q_heads + head.to(tl.int64)) * max_chunks + chunk_lo  # [BLOCK_M]
        tl.store(max_ptr + stat, m_run, mask=row_ok)
        tl.store(sum_ptr + stat, l_run, mask=row_ok)
        tl.store(acc_ptr + (stat * HEAD_DIM)[:, None] + cols, acc, mask=q_mask)
    else:
        out = tl.math.div_rn(acc, tl.where(l_run > 0, l_run, 1.0)[:, None])  # IEEE in both kernels
        _finish_rows(
            out, out_ptr, token, head, row_ok, rotation_ptr, output_offset_ptr, stride_o_tok, stride_o_head,
            BLOCK_M, HEAD_DIM, D_PAD, STAGES, ONE_BLOCK, HAS_OUTPUT_OFFSET,
        )  # fmt: skip


@triton.jit
def _nf4_attention_merge_kernel(
    out_ptr,  # [num_tokens, num_q_heads, head_dim], model space
    acc_ptr,  # [num_tokens, num_q_heads, max_chunks, head_dim] fp32
    max_ptr,  # [num_tokens, num_q_heads, max_chunks] fp32
    sum_ptr,  # [num_tokens, num_q_heads, max_chunks] fp32
    query_start_loc_ptr,  # [num_seqs + 1]
    seq_lens_ptr,  # [num_seqs]
    rotation_ptr,
    output_offset_ptr,
    num_seqs,
    num_q_heads,
    max_chunks,
    stride_o_tok: tl.int64,
    stride_o_head: tl.int64,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    CHUNK_TILES: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    STAGES: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_OUTPUT_OFFSET: tl.constexpr,
):
    """The split programs' chunk states merged in chunk order, as the unsplit kernel merges them."""
    kv_head = tl.program_id(1)
    seq, q_start, q_len, local_tile, context_len, kv_len, valid = _query_tile(
        query_start_loc_ptr, seq_lens_ptr, num_seqs, BLOCK_Q, CAUSAL
    )
    if not valid:
        return
    num_chunks = tl.cdiv(tl.cdiv(kv_len, TILE_N), CHUNK_TILES)
    q_pos, token, head, row_ok = _tile_rows(
        local_tile, q_start, q_len, kv_head, BLOCK_M, BLOCK_Q, QUERIES_PER_KV
    )
    HALF_PAD: tl.constexpr = D_PAD // 2
    half = tl.arange(0, HALF_PAD)[None, :]
    half_mask = row_ok[:, None] & (half < HEAD_DIM // 2)
    stat0 = (token * num_q_heads + head.to(tl.int64)) * max_chunks  # [BLOCK_M]
    m_run = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_even = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    acc_odd = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    for chunk in range(0, num_chunks):
        stat = stat0 + chunk
        m_c = tl.load(max_ptr + stat, mask=row_ok, other=float("-inf"))
        l_c = tl.load(sum_ptr + stat, mask=row_ok, other=0.0)
        c_ptrs = acc_ptr + (stat * HEAD_DIM)[:, None] + 2 * half
        c_even = tl.load(c_ptrs, mask=half_mask, other=0.0)
        c_odd = tl.load(c_ptrs + 1, mask=half_mask, other=0.0)
        m_run, l_run, acc_even, acc_odd = _merge(m_run, l_run, acc_even, acc_odd, m_c, l_c, c_even, c_odd)
    acc = tl.reshape(tl.join(acc_even, acc_odd), [BLOCK_M, D_PAD])
    out = tl.math.div_rn(acc, tl.where(l_run > 0, l_run, 1.0)[:, None])  # IEEE in both kernels
    _finish_rows(
        out, out_ptr, token, head, row_ok, rotation_ptr, output_offset_ptr, stride_o_tok, stride_o_head,
        BLOCK_M, HEAD_DIM, D_PAD, STAGES, ONE_BLOCK, HAS_OUTPUT_OFFSET,
    )  # fmt: skip


# Whether @triton.jit built interpreted kernels (TRITON_INTERPRET=1 when this module
# was imported); read from the kernel itself, not from the environment at call time.
_INTERPRETED = not isinstance(_nf4_attention_kernel, triton.runtime.jit.JITFunction)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_NUM_SMS


def tile_tokens(head_dim: int, dtype: torch.dtype) -> int:
    """``TILE_N``: keys per step of the kernel for this head size and query dtype."""
    return _TILE_N if head_dim <= 128 and dtype != torch.float32 else _TILE_N_SMALL


def chunk_plan(max_model_len: int) -> tuple[int, int]:
    """``(chunk_tokens, max_chunks)`` for an engine serving up to ``max_model_len`` tokens: keys
    per chunk, a model-level constant (so a query's bits never depend on the batch), and the
    chunks of the longest sequence (at most MAX_CHUNKS), the split grid's third axis."""
    tokens = max(DEFAULT_CHUNK_TOKENS, triton.cdiv(max_model_len, MAX_CHUNKS))
    chunk_tokens = triton.cdiv(tokens, _TILE_N) * _TILE_N
    return chunk_tokens, triton.cdiv(max_model_len, chunk_tokens)


def should_split(
    num_seqs: int, num_kv_heads: int, max_query_len: int, workspace_bytes: int, device: torch.device
) -> bool:
    """Split-K for decode batches that leave SMs idle (the module's launch notes); host ints only."""
    if max_query_len > SPLIT_MAX_QUERY_LEN or workspace_bytes > SPLIT_WORKSPACE_BYTES or num_seqs == 0:
        return False
    return num_seqs * num_kv_heads < _PROGRAMS_PER_SM * _num_sms(device)


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


def _check_inputs(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    layout: CellLayout,
    softmax_scale: float,
) -> None:
    check_paged_cache(kv_cache, layout)
    require_scheme(layout)
    if kv_cache.stride(-1) != 1:
        raise ValueError(
            f"kv_cache cells must be contiguous (stride 1 in the last dim), got {kv_cache.stride()}"
        )
    num_kv_heads = kv_cache.shape[1]
    if query.dtype not in _QUERY_DTYPES:
        raise TypeError(f"query must be float32, float16 or bfloat16, got {query.dtype}")
    if query.dim() != 3 or query.shape[2] != layout.head_dim or query.stride(-1) != 1:
        raise ValueError(
            f"query must be [num_tokens, num_q_heads, {layout.head_dim}] with contiguous "
            f"head vectors, got {tuple(query.shape)} stride {query.stride()}"
        )
    if query.shape[1] % num_kv_heads:
        raise ValueError(
            f"num_q_heads={query.shape[1]} must be a multiple of the cache's num_kv_heads={num_kv_heads}"
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


def nf4_paged_attention(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_dim] fp32/fp16/bf16, model space
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32/int64
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32/int64 (cu_seqlens_q)
    seq_lens: torch.Tensor,  # [num_seqs] int32/int64, keys per sequence incl. the new queries
    layout: CellLayout,
    softmax_scale: float,
    *,
    query_scale: torch.Tensor | None = None,  # [num_q_heads, head_dim] fp32: 1 / d (calibration)
    output_offset: torch.Tensor | None = None,  # [num_q_heads, head_dim] fp32: mu (calibration)
    max_query_len: int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    max_chunks: int | None = None,
    split: bool | None = None,
    causal: bool = True,
    output: torch.Tensor | None = None,  # [num_tokens, num_q_heads, head_dim], any float dtype
) -> torch.Tensor:
    """Attention of model-space queries over the NF4 paged cache; returns the model-space output.

    The result is ``unrotate(attention(rotate(query * query_scale))) + output_offset``, the
    CPU path's arithmetic; a query's bits do not depend on its batch (module docstring).
    ``chunk_tokens`` (a multiple of the key tile, :func:`chunk_plan`) is part of that
    arithmetic: keep it fixed per engine. Split-K is the host's choice (``split``, default
    :func:`should_split` on ``max_query_len``, which costs one host sync when not given)
    and needs ``max_chunks`` (keys per sequence / ``chunk_tokens``; default from
    ``seq_lens``, one more sync; the backend passes both from the engine's configuration).
    Query tokens past ``query_start_loc[-1]`` (padding) are left unwritten.
    """
    _check_inputs(query, kv_cache, block_table, query_start_loc, seq_lens, layout, softmax_scale)
    num_tokens, num_q_heads = query.shape[:2]
    num_kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    head_dim = layout.head_dim
    check_head_table("query_scale", query_scale, num_q_heads, head_dim, kv_cache.device)
    check_head_table("output_offset", output_offset, num_q_heads, head_dim, kv_cache.device)
    tile_n = tile_tokens(head_dim, query.dtype)
    if chunk_tokens <= 0 or chunk_tokens % _TILE_N:
        raise ValueError(f"chunk_tokens must be a positive multiple of {_TILE_N}, got {chunk_tokens}")
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
    num_seqs = block_table.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return output

    queries_per_kv = num_q_heads // num_kv_heads
    block_m = max(16, next_power_of_2(queries_per_kv))
    block_q = block_m // queries_per_kv
    if max_chunks is None and split is not False:
        max_chunks = triton.cdiv(int(seq_lens.max()), chunk_tokens)
    if split is None:
        if max_query_len is None:
            max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
        workspace = num_tokens * num_q_heads * max_chunks * head_dim * 4
        split = should_split(num_seqs, num_kv_heads, max_query_len, workspace, kv_cache.device)
    dot_dtype, dot_precision = _dot_types(query.dtype)
    levels, _ = nf4_tables(kv_cache.device)
    rotation = rotation_table(head_dim, kv_cache.device)
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, max_chunks if split else 1)
    shape = dict(
        QUERIES_PER_KV=queries_per_kv,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        TILE_N=tile_n,
        CHUNK_TILES=chunk_tokens // tile_n,
        HEAD_DIM=head_dim,
        **rotation_constexprs(head_dim),
        CAUSAL=causal,
        HAS_OUTPUT_OFFSET=output_offset is not None,
    )
    ladders = ladder_table(layout.key, kv_cache.device), ladder_table(layout.value, kv_cache.device)
    tables = (
        levels,
        *ladders,
        rotation,
        rotation if query_scale is None else query_scale,
        rotation if output_offset is None else output_offset,
    )
    strides = (*query.stride()[:2], *kv_cache.stride()[:3], block_table.stride(0), *output.stride()[:2])
    scale_log2 = softmax_scale * _LOG2E
    if split:
        partial_shape = (num_tokens, num_q_heads, max_chunks)
        acc = torch.empty((*partial_shape, head_dim), dtype=torch.float32, device=query.device)
        stats = torch.empty((2, *partial_shape), dtype=torch.float32, device=query.device)
        partials = (acc, stats[0], stats[1])
    else:
        max_chunks = 1
        partials = (output, output, output)  # unread
    _nf4_attention_kernel[grid](
        query, kv_cache, block_table, query_start_loc, seq_lens, *tables, output, *partials,
        scale_log2, num_seqs, num_q_heads, max_chunks, *strides,
        **shape,
        BLOCK_SIZE=block_size,
        VALUE_OFFSET=layout.value_offset,
        K_GROUP=layout.key.group_size,
        K_SCALE_OFFSET=layout.key.scale_offset,
        K_RELATIVE_BITS=relative_bits(layout.key),
        V_GROUP=layout.value.group_size,
        V_SCALE_OFFSET=layout.value.scale_offset,
        V_RELATIVE_BITS=relative_bits(layout.value),
        ROW_ALIGN=alignment(*kv_cache.stride()[:3]),
        SPLIT=split,
        HAS_QUERY_SCALE=query_scale is not None,
        DOT_DTYPE=dot_dtype,
        DOT_PRECISION=dot_precision,
        num_warps=_NUM_WARPS,
        num_stages=_NUM_STAGES,
        enable_fp_fusion=False,  # the chunk merges round alike in both kernels (batch invariance)
    )  # fmt: skip
    if split:
        _nf4_attention_merge_kernel[grid[:2]](
            output, *partials, query_start_loc, seq_lens, rotation, tables[-1],
            num_seqs, num_q_heads, max_chunks, *output.stride()[:2],
            **shape,
            num_warps=_NUM_WARPS,
            enable_fp_fusion=False,
        )  # fmt: skip
    return output
