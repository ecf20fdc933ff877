"""The PyTorch fallback path's attention over NF4 pages against the attention reference, same cache."""

from __future__ import annotations

import pytest
import torch
from paged_cases import fill_cache

from vllm_nf4kv import reference
from vllm_nf4kv.format import RowFormat
from vllm_nf4kv.paged_attention import paged_attention
from vllm_nf4kv.reference_attention import paged_attention_reference

HEAD_DIMS = [64, 128]
GQA = [(4, 4), (8, 2), (9, 3)]
BLOCK_SIZES = [16, 128]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("heads", GQA)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_mixed_batch_matches_the_reference(head_dim, heads, block_size):
    num_heads, num_kv_heads = heads
    seq_lens = [1, 37, 130, 20, 9]  # decode at 1, decode, chunk of 7 after 123, decode, whole prefill
    query_lens = [1, 1, 7, 1, 9]
    cache, table, layout = fill_cache(seq_lens, num_kv_heads, head_dim, block_size)
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    query = torch.randn(starts[-1], num_heads, head_dim)
    scale = head_dim**-0.5
    got = paged_attention(
        query, cache, layout, torch.tensor(starts), torch.tensor(seq_lens), table, scale
    )
    want = paged_attention_reference(query, cache, table, starts, seq_lens, layout, scale)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_sliding_window_matches_the_reference():
    seq_lens = [50, 40]  # a decode and a 6-token chunk
    cache, table, layout = fill_cache(seq_lens, 2, 64, 16, seed=3)
    starts = [0, 1, 7]
    query = torch.randn(7, 4, 64)
    got = paged_attention(
        query, cache, layout, torch.tensor(starts), torch.tensor(seq_lens), table, 0.125, sliding_window=8
    )
    want = paged_attention_reference(query, cache, table, starts, seq_lens, layout, 0.125, sliding_window=8)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_a_request_gets_the_same_bits_alone_or_batched():
    """Batch invariance is what makes chunked prefill and prefix-cache hits exact in vLLM.

    The fp64 results may differ in their last bits; what the model sees, the
    result rounded to its dtype (bf16 here, fp32 at most), must not.
    """
    seq_lens = [300, 64, 17]
    cache, table, layout = fill_cache(seq_lens, 3, 64, 16, seed=1)
    query = torch.randn(3, 9, 64)
    starts = torch.tensor([0, 1, 2, 3])
    batched = paged_attention(query, cache, layout, starts, torch.tensor(seq_lens), table, 0.1)
    for r in range(3):
        alone = paged_attention(
            query[r : r + 1], cache, layout, torch.tensor([0, 1]), torch.tensor(seq_lens[r : r + 1]),
            table[r : r + 1], 0.1,
        )
        assert torch.equal(alone[0].float(), batched[r].float())
        assert torch.equal(alone[0].bfloat16(), batched[r].bfloat16())


def test_table_decode_equals_the_math():
    gen = torch.Generator().manual_seed(2)
    fmt = RowFormat(64, 16)
    rows = torch.randint(0, 256, (500, fmt.row_bytes), dtype=torch.uint8, generator=gen)
    codes = reference.unpack_nibbles(rows[:, : fmt.code_bytes])
    want = reference.dequantize_groups(codes, rows[:, fmt.scale_offset :], fmt.group_size)
    assert torch.equal(reference.decode_rows_rotated(rows, fmt), want)
