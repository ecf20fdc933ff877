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

The kernels, their design and why a query's bits never depend on its batch are in
:mod:`vllm_nf4kv.kernels.triton_attention_kernels`; this module is their host side: input
checks, the fixed launch heuristics, the chunk plan, the split-K choice and the launches.

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
from vllm_nf4kv.kernels.triton_attention_kernels import _nf4_attention_kernel, _nf4_attention_merge_kernel
from vllm_nf4kv.kernels.triton_codec import (
    alignment,
    cell_reader_constexprs,
    check_head_table,
    ladder_table,
    next_power_of_2,
    nf4_tables,
    require_scheme,
)
from vllm_nf4kv.kernels.triton_rotation import rotation_constexprs, rotation_table
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
    CPU path's arithmetic; a query's bits do not depend on its batch (:mod:`.triton_attention_kernels`).
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
        **cell_reader_constexprs(layout),
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
