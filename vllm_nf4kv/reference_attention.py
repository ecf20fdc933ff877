"""Paged attention over an NF4 cache in plain fp64: the ground truth for every attention kernel.

Beside :mod:`vllm_nf4kv.reference` (the codec), this is the one attention reference: the
C++ kernels' tests, the Triton kernels' tests, the conformance test and
``scripts/bench_kernels.py --check`` all compare against it, with the tolerances of
:data:`ATTENTION_TOLERANCE`. It dequantizes each sequence with
:func:`vllm_nf4kv.reference.read_paged` and runs softmax attention in fp64, so a kernel's
error is measured on the *same dequantized cache*, apart from quantization error.

It works in the rotated space, as the cache does: pass ``rotate(query)`` and apply
``unrotate`` to the result to compare with kernels that rotate inside (the C++ ones).
It is written to be read, one sequence at a time; the production PyTorch path
(:mod:`vllm_nf4kv.paged_attention`) is batched and is tested against it like any kernel.
"""

from __future__ import annotations

import torch

from vllm_nf4kv.format import CellLayout
from vllm_nf4kv.reference import read_paged

# (atol, rtol) a kernel's output may differ from this reference by, on the same cache,
# by the query dtype the kernel computes in: fp32 kernels accumulate in fp32 (a few ulp
# over a few hundred keys); fp16 / bf16 round the probabilities and values they multiply.
ATTENTION_TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def paged_attention_reference(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_dim], rotated
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int
    query_start_loc: torch.Tensor | list[int],  # [num_seqs + 1]
    seq_lens: torch.Tensor | list[int],  # [num_seqs], keys per sequence incl. the new queries
    layout: CellLayout,
    softmax_scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """fp64 rotated output ``[num_tokens, num_q_heads, head_dim]`` (tokens of no sequence stay 0).

    Query ``i`` of a sequence with ``q_len`` new tokens sits at position
    ``seq_len - q_len + i``; with ``causal`` it sees keys up to that position, and with a
    ``sliding_window`` of W only the last W of those (vLLM's convention: the window
    includes the query's own position).
    """
    starts = query_start_loc.tolist() if isinstance(query_start_loc, torch.Tensor) else list(query_start_loc)
    lens = seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else list(seq_lens)
    num_q_heads = query.shape[1]
    out = torch.zeros(query.shape, dtype=torch.float64, device=query.device)
    for seq, seq_len in enumerate(lens):
        q_lo, q_hi = starts[seq], starts[seq + 1]
        if q_hi == q_lo:
            continue
        key, value = read_paged(kv_cache, block_table[seq], seq_len, layout)  # [seq_len, H_kv, D]
        group = num_q_heads // key.shape[1]
        key = key.double().repeat_interleave(group, dim=1)  # [seq_len, H_q, D]
        value = value.double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query[q_lo:q_hi].double(), key) * softmax_scale
        q_pos = torch.arange(seq_len - (q_hi - q_lo), seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        allowed = torch.ones(q_hi - q_lo, seq_len, dtype=torch.bool, device=query.device)
        if causal:
            allowed &= k_pos <= q_pos
        if sliding_window is not None and sliding_window > 0:
            allowed &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        out[q_lo:q_hi] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), value)
    return out
