"""Pure-torch paged attention over the NF4 cache: what the Triton attention is tested against.

It dequantizes each sequence with :func:`vllm_nf4kv.reference.read_paged` and runs
plain fp32 softmax attention in the rotated space, one sequence at a time, so the
kernel's error is measured on the *dequantized* cache, apart from quantization error.
"""

from __future__ import annotations

import torch

from vllm_nf4kv.format import CellLayout
from vllm_nf4kv.reference import read_paged


def paged_attention_reference(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_dim], rotated
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int
    seq_lens: torch.Tensor,  # [num_seqs] int, keys per sequence incl. the new queries
    layout: CellLayout,
    softmax_scale: float,
    causal: bool = True,
) -> torch.Tensor:
    """fp32 rotated output ``[num_tokens, num_q_heads, head_dim]`` (padding tokens stay 0).

    Query ``i`` of a sequence with ``q_len`` new tokens sits at position
    ``seq_len - q_len + i``; with ``causal`` it sees keys ``0 ..`` that position.
    """
    num_q_heads = query.shape[1]
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    starts = query_start_loc.tolist()
    for seq, seq_len in enumerate(seq_lens.tolist()):
        q_lo, q_hi = starts[seq], starts[seq + 1]
        if q_hi == q_lo:
            continue
        key, value = read_paged(kv_cache, block_table[seq], seq_len, layout)  # [seq_len, H_kv, D]
        group = num_q_heads // key.shape[1]
        key = key.repeat_interleave(group, dim=1)  # [seq_len, H_q, D]
        value = value.repeat_interleave(group, dim=1)
        q = query[q_lo:q_hi].float()  # [q_len, H_q, D]
        scores = torch.einsum("qhd,khd->hqk", q, key) * softmax_scale
        if causal:
            q_pos = torch.arange(seq_len - (q_hi - q_lo), seq_len, device=query.device)
            k_pos = torch.arange(seq_len, device=query.device)
            scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[q_lo:q_hi] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), value)
    return out
