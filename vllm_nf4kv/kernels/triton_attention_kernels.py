"""The ``@triton.jit`` side of ``nf4_paged_attention``: the attention kernel and the split-K merge.

Host-side code (input checks, launch heuristics, the chunk plan and the split-K choice, the
launches) is :mod:`vllm_nf4kv.kernels.triton_attention`, the module to import; this one holds
only device code, so the arithmetic a query's bits depend on reads in one place.

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
"""

from __future__ import annotations

import triton
import triton.language as tl

from vllm_nf4kv.kernels.triton_codec import dequant_pairs
from vllm_nf4kv.kernels.triton_rotation import rotate_rows, unrotate_rows


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
