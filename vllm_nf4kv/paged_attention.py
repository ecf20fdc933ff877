"""Attention over paged NF4 caches in plain PyTorch: the CPU backend's fallback path.

The CPU backend runs this where the C++ kernels cannot be built. It is batched for
speed and is *not* the ground truth: like every kernel it is tested against
:mod:`vllm_nf4kv.reference_attention`. It dequantizes exactly the blocks a batch
reads (the reference codec, bit for bit) and calls ``scaled_dot_product_attention``
in the rotated space: queries are rotated before and outputs rotated back after, by
the caller.

Attention is computed in fp64 (``ATTENTION_DTYPE``). Why: fp32 SDPA results depend
on the batch shape, and a 135M bf16 model amplifies one-ulp differences into
different greedy tokens. fp64 results still vary in their last bits with the
batch shape, but rounded to the model's dtype (bf16/fp16/fp32) they are the
same whether a request is prefilled whole, in chunks, or after a prefix-cache
hit, so those paths reproduce each other bit for bit.

Decode requests (one query token) are attended together in bounded chunks;
prefill and chunked-prefill requests one at a time, with the causal mask
offset so query ``j`` of a request of ``seq_len`` tokens sees keys
``t <= seq_len - q_len + j``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_nf4kv.format import CellLayout
from vllm_nf4kv.reference import check_paged_cache, decode_cells_rotated

ATTENTION_DTYPE = torch.float64

# Upper bound on (requests x tokens) dequantized at once for batched decode:
# keeps the fp32 K/V scratch of one chunk near 64k tokens x heads x head_dim.
DECODE_CHUNK_TOKENS = 65536


def gather_kv(
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int
    num_tokens: int,
    layout: CellLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize the first ``num_tokens`` tokens of each request: rotated fp32 ``[R, H, L, D]``."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-num_tokens // block_size)
    cells = kv_cache[block_table[:, :num_blocks].long()]  # [R, n, H, bs, C]
    cells = cells.permute(0, 2, 1, 3, 4).flatten(2, 3)[:, :, :num_tokens]  # [R, H, L, C]
    return decode_cells_rotated(cells, layout)


def _attend(
    query: torch.Tensor,  # [R, Hq, Q, D] ATTENTION_DTYPE
    key: torch.Tensor,  # [R, Hkv, L, D] fp32
    value: torch.Tensor,  # [R, Hkv, L, D] fp32
    key_pos: torch.Tensor,  # [L]
    query_pos: torch.Tensor,  # [R, Q] absolute position of each query
    seq_lens: torch.Tensor,  # [R]
    scale: float,
    causal: bool,
    sliding_window: int | None,
) -> torch.Tensor:
    key, value = key.to(ATTENTION_DTYPE), value.to(ATTENTION_DTYPE)
    allowed = key_pos[None, None, :] < seq_lens[:, None, None]  # [R, 1, L]
    if causal:
        allowed = allowed & (key_pos[None, None, :] <= query_pos[:, :, None])
    if sliding_window is not None and sliding_window > 0:
        allowed = allowed & (key_pos[None, None, :] > query_pos[:, :, None] - sliding_window)
    # GQA without expanding K/V: the G query heads of a KV head become G x Q rows.
    num_reqs, num_heads, num_queries, head_dim = query.shape
    group = num_heads // key.shape[1]
    rows = query.reshape(num_reqs, key.shape[1], group * num_queries, head_dim)
    mask = allowed.expand(num_reqs, num_queries, key.shape[2]).repeat(1, group, 1).unsqueeze(1)
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=mask, scale=scale)
    return out.view(num_reqs, num_heads, num_queries, head_dim)


def _decode_chunks(requests: list[int], lens: list[int]) -> list[list[int]]:
    """Split length-sorted requests so each chunk has count x longest <= the budget."""
    chunks: list[list[int]] = []
    chunk: list[int] = []
    for r in requests:
        if chunk and (len(chunk) + 1) * lens[r] > DECODE_CHUNK_TOKENS:
            chunks.append(chunk)
            chunk = []
        chunk.append(r)
    if chunk:
        chunks.append(chunk)
    return chunks


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8
    layout: CellLayout,
    query_start_loc: torch.Tensor,  # [num_reqs + 1]
    seq_lens: torch.Tensor,  # [num_reqs], tokens in the cache incl. this step's
    block_table: torch.Tensor,  # [num_reqs, max_blocks]
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of every query token over its request's NF4 pages: ``[num_tokens, Hq, D]`` in fp64."""
    check_paged_cache(kv_cache, layout)
    if query.dim() != 3 or query.shape[-1] != layout.head_dim:
        raise ValueError(
            f"query must be [num_tokens, num_heads, {layout.head_dim}], got {tuple(query.shape)}"
        )
    if query.shape[1] % kv_cache.shape[1]:
        raise ValueError(f"num_heads {query.shape[1]} is not a multiple of num_kv_heads {kv_cache.shape[1]}")
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    num_reqs = len(lens)
    out = torch.zeros(starts[-1], query.shape[1], query.shape[2], dtype=ATTENTION_DTYPE, device=query.device)
    query = query.to(ATTENTION_DTYPE)
    decode = [r for r in range(num_reqs) if starts[r + 1] - starts[r] == 1]
    others = [r for r in range(num_reqs) if starts[r + 1] - starts[r] > 1]

    # Batched decode, chunked so the dequantized scratch stays bounded.
    for chunk in _decode_chunks(sorted(decode, key=lambda r: lens[r]), lens):
        longest = lens[chunk[-1]]
        rows = torch.tensor(chunk, device=block_table.device)
        key, value = gather_kv(kv_cache, block_table[rows], longest, layout)
        lens_t = torch.tensor([lens[r] for r in chunk], device=query.device)
        q = query[torch.tensor([starts[r] for r in chunk], device=query.device)].unsqueeze(2)  # [R, Hq, 1, D]
        result = _attend(
            q, key, value, torch.arange(longest, device=query.device), (lens_t - 1)[:, None],
            lens_t, scale, causal, sliding_window,
        )
        out[[starts[r] for r in chunk]] = result.squeeze(2)

    for r in others:
        q_len, seq_len = starts[r + 1] - starts[r], lens[r]
        key, value = gather_kv(kv_cache, block_table[r : r + 1], seq_len, layout)
        q = query[starts[r] : starts[r + 1]].transpose(0, 1).unsqueeze(0)  # [1, Hq, Q, D]
        query_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[None, :]
        result = _attend(
            q, key, value, torch.arange(seq_len, device=query.device), query_pos,
            torch.tensor([seq_len], device=query.device), scale, causal, sliding_window,
        )
        out[starts[r] : starts[r + 1]] = result[0].transpose(0, 1)
    return out
