"""The C++ CPU kernels against the reference: store byte for byte, attention against dense fp64.

Two builds are checked: the native one (AVX-512 on this project's machines)
and a ``-march=x86-64-v3`` one that takes the portable loops; they must agree
bit for bit, since they do the same fp32 operations in the same order.
"""

from __future__ import annotations

import pytest
import torch
from paged_cases import dense_attention, fill_cache

from vllm_nf4kv import cpu_kernels, reference
from vllm_nf4kv.format import SCALE_MAX, CellLayout, RowFormat
from vllm_nf4kv.rotation import rotate, unrotate


@pytest.fixture(scope="module")
def native():
    if not cpu_kernels.available():
        pytest.fail("the C++ kernels did not build here (see the log); they must on the project's machines")
    return cpu_kernels.build()


@pytest.fixture(scope="module")
def portable():
    return cpu_kernels.build("nf4kv_cpu_portable", "-march=x86-64-v3")


def test_the_two_builds_take_different_paths(native, portable):
    assert not portable.has_avx512()
    # this project's CI machines have AVX-512 (F, BW and VL); elsewhere both builds are portable
    flags = cpu_kernels._cpu_flags().split()
    assert native.has_avx512() == all(f in flags for f in ("avx512f", "avx512bw", "avx512vl"))


def _kv(num_tokens, heads, head_dim, seed, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    key = (torch.randn(num_tokens, heads, head_dim, generator=gen) * 3).to(dtype)
    value = torch.randn(num_tokens, heads, head_dim, generator=gen).to(dtype)
    key[1, 0, 5] += 40  # an outlier channel, as real keys have
    return key, value


def _store(kv_cache, key, value, slots, layout, ops):
    cpu_kernels.store(kv_cache, key, value, slots, layout, ops=ops)


@pytest.mark.parametrize("head_dim", [16, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("build", ["native", "portable"])
def test_store_writes_the_reference_bytes(head_dim, build, request):
    ops = request.getfixturevalue(build)
    layout = CellLayout.for_head_dim(head_dim)
    key, value = _kv(300, 3, head_dim, seed=head_dim)
    key[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    key[2, 1] = 0  # all-zero groups
    value[3, 2] = 1e30  # beyond the largest scale: clamps
    value[4, 0] = 1e-30  # below the smallest scale
    slots = torch.randperm(40 * 16, generator=torch.Generator().manual_seed(1))[:300]
    slots[7] = -1  # padding token: skipped
    want = torch.zeros(40, 3, 16, layout.cell_bytes, dtype=torch.uint8)
    got = want.clone()
    reference.write_paged(want, key, value, slots, layout)
    _store(got, key, value, slots, layout, ops)
    assert torch.equal(got, want)


@pytest.mark.parametrize("steps", [1, 2, 8])
def test_store_honours_the_search_steps(native, steps):
    layout = CellLayout.for_head_dim(64)
    key, value = _kv(50, 2, 64, seed=steps, dtype=torch.float32)
    slots = torch.arange(50)
    want = torch.zeros(4, 2, 16, layout.cell_bytes, dtype=torch.uint8)
    got = want.clone()
    reference.write_paged(want, key, value, slots, layout, search_steps=steps)
    cpu_kernels.store(got, key, value, slots, layout, search_steps=steps, ops=native)
    assert torch.equal(got, want)


def test_store_refuses_bad_input(native):
    layout = CellLayout.for_head_dim(64)
    cache = torch.zeros(2, 1, 16, layout.cell_bytes, dtype=torch.uint8)
    key = torch.zeros(1, 1, 64)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels.store(cache, key, key, torch.tensor([32]), layout, ops=native)
    with pytest.raises(RuntimeError, match="KV heads"):
        two_heads = torch.zeros(1, 2, 64)
        cpu_kernels.store(cache, two_heads, two_heads, torch.tensor([0]), layout, ops=native)
    with pytest.raises(ValueError, match="nf4 cache must be uint8"):
        cpu_kernels.store(cache.float(), key, key, torch.tensor([0]), layout, ops=native)
    assert int(cache.sum()) == 0
    assert float(SCALE_MAX) == 61440.0  # the constant csrc/nf4_cpu.cpp hard-codes as kScaleMax


def dense_in_model_space(query, *args, **kwargs):
    """The kernel rotates queries in and outputs back; the dense reference works in the rotated space."""
    rotated = dense_attention(rotate(query, torch.float64), *args, **kwargs)
    return unrotate(rotated, torch.float64)


def _mixed_batch(head_dim, num_heads, num_kv_heads, block_size, seed=0, layout=None):
    seq_lens = [1, 37, 130, 20, 9, 200]  # decodes, a chunk of 7 after 123, a prefill, a 70-query chunk
    query_lens = [1, 1, 7, 1, 9, 70]
    cache, table, layout = fill_cache(seq_lens, num_kv_heads, head_dim, block_size, seed=seed, layout=layout)
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    query = torch.randn(starts[-1], num_heads, head_dim, generator=torch.Generator().manual_seed(seed))
    return cache, table, layout, starts, seq_lens, query


@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (9, 3), (8, 1)])
@pytest.mark.parametrize("block_size", [16, 128])
def test_attention_matches_dense(native, head_dim, heads, block_size):
    cache, table, layout, starts, seq_lens, query = _mixed_batch(head_dim, *heads, block_size)
    scale = head_dim**-0.5
    got = cpu_kernels.attention(
        query, cache, layout, torch.tensor(starts), torch.tensor(seq_lens), table, scale, ops=native
    )
    want = dense_in_model_space(query, cache, table, layout, starts, seq_lens, scale)
    assert got.dtype == torch.float32
    # fp32 fma chains over up to 256 dims / 200 keys vs fp64: errors of a few 1e-6 at most
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [1, 8, 100])
def test_sliding_window_matches_dense(native, window):
    cache, table, layout, starts, seq_lens, query = _mixed_batch(64, 4, 2, 16, seed=3)
    got = cpu_kernels.attention(
        query, cache, layout, torch.tensor(starts), torch.tensor(seq_lens), table, 0.125,
        sliding_window=window, ops=native,
    )
    want = dense_in_model_space(query, cache, table, layout, starts, seq_lens, 0.125, window=window)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_padding_rows_are_zero_and_bad_metadata_is_refused(native):
    cache, table, layout, starts, seq_lens, query = _mixed_batch(64, 4, 2, 16)

    def attend(q, starts, lens):
        starts, lens = torch.tensor(starts), torch.tensor(lens)
        return cpu_kernels.attention(q, cache, layout, starts, lens, table, 0.1, ops=native)

    got = attend(torch.cat([query, torch.randn(5, 4, 64)]), starts, seq_lens)
    assert int(got[starts[-1] :].count_nonzero()) == 0
    with pytest.raises(RuntimeError, match="queries but seq_len"):
        attend(query, [0, 5], [3])
    with pytest.raises(RuntimeError, match="block table too short"):
        attend(query, [0, 1], [10_000])
    with pytest.raises(ValueError, match="query must be"):
        attend(query[..., :32], starts, seq_lens)


@pytest.mark.parametrize("build", ["native", "portable"])
def test_a_query_gets_the_same_bits_however_it_is_batched(build, request):
    """Batch invariance, exact: what makes prefix-cache hits and chunked prefill reproduce a cold run.

    The same 150 query positions of one request are attended (a) as one
    prefill, (b) in chunks of 1/17/132 tokens (chunked prefill, or a hit on a
    cached prefix), (c) each alone as a decode, (d) batched with other
    requests; every row must be bit-identical.
    """
    ops = request.getfixturevalue(build)
    cache, table, layout = fill_cache([150, 300, 40], 3, 64, 16, seed=5)
    query = torch.randn(150, 9, 64, generator=torch.Generator().manual_seed(6))

    def run(q, starts, lens, rows):
        starts, lens = torch.tensor(starts), torch.tensor(lens)
        return cpu_kernels.attention(q, cache, layout, starts, lens, table[rows], 0.125, ops=ops)

    whole = run(query, [0, 150], [150], [0])
    pieces = torch.cat([
        run(query[:1], [0, 1], [1], [0]),
        run(query[1:18], [0, 17], [18], [0]),
        run(query[18:], [0, 132], [150], [0]),
    ])
    decodes = torch.cat([run(query[t : t + 1], [0, 1], [t + 1], [0]) for t in range(0, 150, 7)])
    other = torch.randn(3, 9, 64)
    batched = run(torch.cat([other[:1], query[60:], other[1:]]), [0, 1, 91, 93], [300, 150, 40], [1, 0, 2])
    assert torch.equal(pieces, whole)
    assert torch.equal(decodes, whole[::7])
    assert torch.equal(batched[1:91], whole[60:])


@pytest.mark.parametrize("build", ["native", "portable"])
def test_kv_heads_split_over_ranks_give_the_same_bits(build, request):
    """Tensor parallel: a rank holds the pages of its own KV heads and the queries that read them.

    Storing 4 KV heads in one cache, or 2 and 2 in two (what ranks 0 and 1 of
    ``--tensor-parallel-size 2`` hold), writes the same bytes per head, and
    attention over each half of the query heads (3 per KV head) gives the same
    bits as over all of them: no statistic of the format spans heads.
    """
    ops = request.getfixturevalue(build)
    layout = CellLayout.for_head_dim(64)
    key, value = _kv(70, 4, 64, seed=11)
    query = torch.randn(70, 12, 64, generator=torch.Generator().manual_seed(12))
    slots = torch.arange(70)
    starts, seq_lens, table = torch.tensor([0, 70]), torch.tensor([70]), torch.arange(5)[None]

    def cache_of(heads: slice) -> torch.Tensor:
        cache = torch.zeros(5, heads.stop - heads.start, 16, layout.cell_bytes, dtype=torch.uint8)
        _store(cache, key[:, heads].contiguous(), value[:, heads].contiguous(), slots, layout, ops)
        return cache

    whole = cache_of(slice(0, 4))
    ranks = [cache_of(slice(0, 2)), cache_of(slice(2, 4))]
    assert torch.equal(torch.cat(ranks, dim=1), whole)
    full = cpu_kernels.attention(query, whole, layout, starts, seq_lens, table, 0.125, ops=ops)
    for rank, cache in enumerate(ranks):
        rows = slice(6 * rank, 6 * rank + 6)
        part = cpu_kernels.attention(
            query[:, rows].contiguous(), cache, layout, starts, seq_lens, table, 0.125, ops=ops
        )
        assert torch.equal(part, full[:, rows]), rank


def test_native_and_portable_builds_agree_bit_for_bit(native, portable):
    for head_dim, heads, window in [(64, (9, 3), None), (128, (8, 2), 50), (80, (4, 4), None)]:
        cache, table, layout, starts, seq_lens, query = _mixed_batch(head_dim, *heads, 16, seed=head_dim)
        args = (query, cache, layout, torch.tensor(starts), torch.tensor(seq_lens), table, head_dim**-0.5)
        a = cpu_kernels.attention(*args, sliding_window=window, ops=native)
        b = cpu_kernels.attention(*args, sliding_window=window, ops=portable)
        assert torch.equal(a, b), (head_dim, (a - b).abs().max())


@pytest.mark.parametrize("groups", [(64, 4, 8), (64, 8, 32), (96, 12, 48), (128, 8, 16)])
def test_other_group_sizes_match_dense_and_both_builds(native, portable, groups):
    """Group sizes other than the default take the decoders' other branches (a scale per
    dimension pair, up to 16 scale codes a row, value groups that do not fill a register)."""
    head_dim, key_group, value_group = groups
    layout = CellLayout(RowFormat(head_dim, key_group), RowFormat(head_dim, value_group))
    batch = _mixed_batch(head_dim, 8, 2, 16, seed=key_group, layout=layout)
    cache, table, layout, starts, seq_lens, query = batch
    args = (query, cache, layout, torch.tensor(starts), torch.tensor(seq_lens), table, head_dim**-0.5)
    got = cpu_kernels.attention(*args, ops=native)
    want = dense_in_model_space(query, cache, table, layout, starts, seq_lens, head_dim**-0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got, cpu_kernels.attention(*args, ops=portable))


def test_switch_forces_the_pytorch_path(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert not cpu_kernels.available()
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1")
    assert cpu_kernels.available()
