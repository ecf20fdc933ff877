"""Paged NF4 caches filled through the reference codec (attention over them: ``reference_attention``).

Shared by the PyTorch path's tests, the C++ kernels' tests and the conformance test.
"""

from __future__ import annotations

import torch

from vllm_nf4kv import reference
from vllm_nf4kv.format import format_for


def fill_cache(
    seq_lens, num_kv_heads, head_dim, block_size, seed=0, layout=None, store=reference.write_paged
):
    """Random K/V written through the reference codec (or `store`, same signature) into shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    layout = layout or format_for("nf4", head_dim)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    cache = torch.zeros(num_blocks, num_kv_heads, block_size, layout.cell_bytes, dtype=torch.uint8)
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    used = 0
    for r, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
        table[r, :nb] = order[used : used + nb]
        used += nb
        slots = torch.tensor([int(table[r, t // block_size]) * block_size + t % block_size for t in range(n)])
        key = torch.randn(n, num_kv_heads, head_dim, generator=gen) * 2
        value = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        store(cache, key, value, slots, layout)
    return cache, table, layout
