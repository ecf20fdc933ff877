"""The C++ CPU kernels against the references: the store byte for byte against
:mod:`vllm_nf4kv.reference`, attention against
:func:`vllm_nf4kv.reference_attention.paged_attention_reference` on the same dequantized cache.

Two builds are checked: the native one (AVX-512 on this project's machines) and a
``-march=x86-64-v3`` one that takes the portable loops; they must agree bit for bit, since they
do the same fp32 operations in the same order. Tests that compare the two skip where the native
build has no AVX-512 (both builds would then be the portable one).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch
from paged_cases import fill_cache

from vllm_nf4kv import cpu_kernels, reference
from vllm_nf4kv import format as fmt
from vllm_nf4kv.format import SCALE_CODE_MAX, CellLayout, RowFormat, format_for
from vllm_nf4kv.kernel_limits import CPU_LIMITS
from vllm_nf4kv.kv_transform import KVTransform
from vllm_nf4kv.reference_attention import ATTENTION_TOLERANCE, paged_attention_reference
from vllm_nf4kv.rotation import rotate, unrotate

STORE_HEAD_DIMS = [16, 64, 80, 96, 128, 256]
ATTENTION_HEAD_DIMS = [64, 80, 128, 256]
GQA = [(4, 4), (8, 2), (9, 3), (8, 1)]  # (query heads, KV heads)
BLOCK_SIZES = [16, 128]
BUILDS = ["native", "portable"]
# (head_dim, key group, value group) beside the defaults: a scale per dimension pair, 16 scale
# codes a row, value groups that do not fill a register
OTHER_GROUPS = [(64, 4, 8), (64, 8, 32), (96, 12, 48), (128, 8, 16)]
ATOL, RTOL = ATTENTION_TOLERANCE[torch.float32]


@pytest.fixture(scope="module")
def native():
    if not cpu_kernels.available():
        pytest.fail("the C++ kernels did not build here (see the log); they must on the project's machines")
    return cpu_kernels.build()


@pytest.fixture(scope="module")
def portable():
    return cpu_kernels.build("nf4kv_cpu_portable", "-march=x86-64-v3")


@pytest.fixture(scope="module")
def avx512(native):
    """The native build, for tests that compare its AVX-512 path with the portable one."""
    if not native.has_avx512():
        pytest.skip("this CPU has no AVX-512 (F, BW, VL): the native build takes the portable loops too")
    return native


def test_native_build_takes_avx512_exactly_where_the_cpu_has_it(native, portable):
    assert not portable.has_avx512()
    flags = cpu_kernels._cpu_flags().split()
    assert native.has_avx512() == all(f in flags for f in ("avx512f", "avx512bw", "avx512vl"))


@pytest.mark.parametrize("build", BUILDS)
def test_the_built_constants_are_format_pys(build, request):
    """What the C++ compiled (nf4kv_format.h as the build saw it), not what Python says."""
    built = request.getfixturevalue(build).format_constants()
    assert built == {name: float(value) for name, value in cpu_kernels.header_constants().items()}
    assert built["SCALE_MAX"] == fmt.SCALE_MAX and built["NUM_LEVELS"] == len(fmt.NF4_LEVELS)
    assert built["CPU_MAX_HEAD_DIM"] == CPU_LIMITS.max_head_dim
    assert built["CPU_MAX_QUERY_HEADS_PER_KV_HEAD"] == CPU_LIMITS.max_query_heads_per_kv_head
    assert built["CPU_MAX_SCALE_GROUPS"] == CPU_LIMITS.max_scale_groups


def test_the_kernels_row_geometry_is_row_formats(native):
    for head_dim in (16, 64, 80, 128, 256, 512):
        for group in range(2, head_dim + 1, 2):
            if head_dim % group or head_dim // group > CPU_LIMITS.max_scale_groups:
                continue
            for bits in (0, 1, 3, 5, fmt.MAX_RELATIVE_BITS):
                scheme = fmt.ScaleScheme.TWO_LEVEL if bits else fmt.ScaleScheme.UE5M3_PER_GROUP
                row = RowFormat(head_dim, group, scale_scheme=scheme, relative_bits=bits)
                assert row.code_offset == 0  # the decoders read a row's codes from its first byte
                got = native.row_geometry(head_dim, group, bits)
                want = [row.code_bytes, row.scale_offset, row.scale_bytes, row.row_bytes]
                assert got == want, (head_dim, group, bits)


def test_the_format_header_renders_scale_max_exactly():
    header = cpu_kernels.format_header()
    assert f"constexpr float SCALE_MAX = {fmt.SCALE_MAX.hex()}f;" in header
    assert float.fromhex(fmt.SCALE_MAX.hex()) == fmt.SCALE_MAX


def _kv(num_tokens, heads, head_dim, seed, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    key = (torch.randn(num_tokens, heads, head_dim, generator=gen) * 3).to(dtype)
    value = torch.randn(num_tokens, heads, head_dim, generator=gen).to(dtype)
    key[1, 0, 5] += 40  # an outlier channel, as real keys have
    return key, value


def _store_matches_reference(layout: CellLayout, key, value, slots, num_blocks: int, ops) -> torch.Tensor:
    """The op's cache after storing K/V at ``slots`` (16-token blocks), asserted equal to the reference's."""
    want = torch.zeros(num_blocks, key.shape[1], 16, layout.cell_bytes, dtype=torch.uint8)
    got = want.clone()
    reference.write_paged(want, key, value, slots, layout)
    cpu_kernels.store(got, key, value, slots, layout, ops=ops)
    assert torch.equal(got, want)
    return got


@pytest.mark.parametrize("head_dim", STORE_HEAD_DIMS)
@pytest.mark.parametrize("build", BUILDS)
def test_store_writes_the_reference_bytes(head_dim, build, request):
    ops = request.getfixturevalue(build)
    layout = format_for("nf4", head_dim)
    key, value = _kv(300, 3, head_dim, seed=head_dim)
    key[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    key[2, 1] = 0  # all-zero groups
    value[3, 2] = 1e30  # beyond the largest scale: clamps
    value[4, 0] = 1e-30  # below the smallest scale
    slots = torch.randperm(40 * 16, generator=torch.Generator().manual_seed(1))[:300]
    slots[7] = -1  # padding token: skipped
    _store_matches_reference(layout, key, value, slots, 40, ops)


@pytest.mark.parametrize("build", BUILDS)
def test_extremes_store_what_the_reference_stores(build, request):
    """The C++ SCALE_MAX at work: +inf is sanitized to it and 1e30 scales clamp to its code.

    A lone +inf spreads over the vector as +-SCALE_MAX / sqrt(d) by the rotation, so its scale
    codes are only right if the C++ sanitizes to exactly format.SCALE_MAX; a vector of 1e30
    needs the largest code, SCALE_CODE_MAX, where its rotated magnitude is largest.
    """
    ops = request.getfixturevalue(build)
    layout = format_for("nf4", 64)
    key = torch.zeros(4, 1, 64)
    key[0, 0, 0] = float("inf")
    key[1, 0, 9] = -float("inf")
    key[2] = 1e30
    key[3] = -1e30
    value = key.flip(0).contiguous()
    got = _store_matches_reference(layout, key, value, torch.arange(4), 1, ops)
    scale_codes = got[0, 0, :, layout.key.scale_offset : layout.key.row_bytes]
    assert bool((scale_codes[2:4] == SCALE_CODE_MAX).any(-1).all())  # 1e30 rows reach the largest code


@pytest.mark.parametrize("steps", [(1, 1), (2, 8), (8, 2), (4, 1)])
def test_store_honours_each_rows_search_steps(native, steps):
    layout = CellLayout(RowFormat(64, 16, search_steps=steps[0]), RowFormat(64, 16, search_steps=steps[1]))
    key, value = _kv(50, 2, 64, seed=sum(steps), dtype=torch.float32)
    _store_matches_reference(layout, key, value, torch.arange(50), 4, native)


# Two-level rows around the AVX-512 side-by-side rung search (codec.h): up to 8 groups of a
# multiple of 8 values, at most 32, go side by side, two search steps a register; the others go
# one group at a time. (head_dim, group, relative bits, search steps): the shipped keys at 64 /
# 128 / 256, groups of 24 (three blocks of 8: an odd pairwise tail), odd and single steps, 1- and
# 8-bit rungs, 6 groups, and the fallbacks (groups of 12; 16 groups; one group of 64).
TWO_LEVEL_ROWS = [(64, 8, 5, 8), (128, 16, 5, 8), (256, 32, 5, 8), (192, 24, 5, 8), (64, 16, 2, 3),
                  (64, 32, 1, 1), (48, 8, 8, 5), (96, 12, 5, 8), (128, 8, 5, 8), (64, 64, 4, 2)]


@pytest.mark.parametrize(("head_dim", "group", "bits", "steps"), TWO_LEVEL_ROWS)
@pytest.mark.parametrize("build", BUILDS)
def test_two_level_keys_store_the_reference_bytes(head_dim, group, bits, steps, build, request):
    ops = request.getfixturevalue(build)
    key_row = RowFormat(head_dim, group, steps, fmt.ScaleScheme.TWO_LEVEL, bits)
    layout = CellLayout(key_row, RowFormat(head_dim, head_dim // 2))
    key, value = _kv(200, 2, head_dim, seed=head_dim + group + bits + steps, dtype=torch.float32)
    key[5, 1, : head_dim // 2] = 0  # all-zero groups
    key[6, 0] = 0  # an all-zero row: scale 0, every rung covers (the last one is stored)
    _store_matches_reference(layout, key, value, torch.arange(200), 13, ops)


def test_store_refuses_bad_input(native):
    layout = format_for("nf4", 64)
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


def test_layouts_beyond_the_cpu_limits_are_refused_before_any_kernel(native, monkeypatch):
    def refused(layout, num_heads=1, match=""):
        cache = torch.zeros(1, 1, 16, layout.cell_bytes, dtype=torch.uint8)
        x = torch.zeros(1, 1, layout.head_dim)
        with pytest.raises(ValueError, match=match):
            cpu_kernels.store(cache, x, x, torch.tensor([0]), layout, ops=native)
        query = torch.zeros(1, num_heads, layout.head_dim)
        with pytest.raises(ValueError, match=match):
            cpu_kernels.attention(
                query, cache, layout, torch.tensor([0, 1]), torch.tensor([1]), torch.zeros(1, 1), 1.0,
                ops=native
            )

    refused(CellLayout(RowFormat(64, 2), RowFormat(64, 16)), match="32 K scale groups a row \\(at most 16")
    big = CPU_LIMITS.max_head_dim + 16
    big_row = RowFormat(big, big // 4)
    refused(CellLayout(big_row, big_row), match=f"head_dim {big} \\(at most {big - 16}\\)")
    monkeypatch.setattr(cpu_kernels, "CPU_LIMITS", dataclasses.replace(CPU_LIMITS, scale_schemes=()))
    refused(format_for("nf4", 64), match="K scale scheme 'two-level', V scale scheme 'ue5m3'")
    monkeypatch.undo()
    layout = format_for("nf4", 64)
    cache = torch.zeros(1, 1, 16, layout.cell_bytes, dtype=torch.uint8)
    too_many = CPU_LIMITS.max_query_heads_per_kv_head + 1
    with pytest.raises(ValueError, match=f"{too_many} query heads per KV head \\(at most {too_many - 1}\\)"):
        cpu_kernels.attention(
            torch.zeros(1, too_many, 64), cache, layout, torch.tensor([0, 1]), torch.tensor([1]),
            torch.zeros(1, 1), 1.0, ops=native,
        )


def reference_in_model_space(query, cache, table, layout, starts, seq_lens, scale, causal=True, window=None):
    """The kernel rotates queries in and outputs back; the reference works in the rotated space."""
    rotated = paged_attention_reference(
        rotate(query, torch.float64), cache, table, starts, seq_lens, layout, scale, causal, window
    )
    return unrotate(rotated, torch.float64)


def _mixed_batch(head_dim, num_heads, num_kv_heads, block_size, seed=0, layout=None):
    seq_lens = [1, 37, 130, 20, 9, 200]  # decodes, a chunk of 7 after 123, a prefill, a 70-query chunk
    query_lens = [1, 1, 7, 1, 9, 70]
    layout = layout or format_for("nf4", head_dim)
    cache, table, layout = fill_cache(seq_lens, num_kv_heads, head_dim, block_size, seed=seed, layout=layout)
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    query = torch.randn(starts[-1], num_heads, head_dim, generator=torch.Generator().manual_seed(seed))
    return cache, table, layout, starts, seq_lens, query


@pytest.mark.parametrize("head_dim", ATTENTION_HEAD_DIMS)
@pytest.mark.parametrize("heads", GQA)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_attention_matches_the_reference(native, head_dim, heads, block_size):
    cache, table, layout, starts, seq_lens, query = _mixed_batch(head_dim, *heads, block_size)
    scale = head_dim**-0.5
    got = cpu_kernels.attention(
        query, cache, layout, torch.tensor(starts), torch.tensor(seq_lens), table, scale, ops=native
    )
    want = reference_in_model_space(query, cache, table, layout, starts, seq_lens, scale)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("window", [1, 8, 100])
def test_sliding_window_matches_the_reference(native, window):
    cache, table, layout, starts, seq_lens, query = _mixed_batch(64, 4, 2, 16, seed=3)
    got = cpu_kernels.attention(
        query, cache, layout, torch.tensor(starts), torch.tensor(seq_lens), table, 0.125,
        sliding_window=window, ops=native,
    )
    want = reference_in_model_space(query, cache, table, layout, starts, seq_lens, 0.125, window=window)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL)


def test_bidirectional_attention_matches_the_reference(native):
    cache, table, layout, starts, seq_lens, query = _mixed_batch(64, 9, 3, 16, seed=4)
    args = (query, cache, layout, torch.tensor(starts), torch.tensor(seq_lens), table, 0.125)
    got = cpu_kernels.attention(*args, causal=False, ops=native)
    want = reference_in_model_space(query, cache, table, layout, starts, seq_lens, 0.125, causal=False)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL)


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
    with pytest.raises(RuntimeError, match="needs query_start_loc"):
        attend(query, [0], [1])
    with pytest.raises(ValueError, match="query must be"):
        attend(query[..., :32], starts, seq_lens)


def _calibration(num_heads, num_kv_heads, head_dim, seed) -> KVTransform:
    gen = torch.Generator().manual_seed(seed)
    key_scale = torch.rand(num_kv_heads, head_dim, generator=gen) * 3 + 0.25
    key_offset = torch.randn(num_kv_heads, head_dim, generator=gen) * 4
    value_offset = torch.randn(num_kv_heads, head_dim, generator=gen) * 2
    return KVTransform(key_scale, key_offset, value_offset, num_heads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("calibrated", [True, False], ids=["calibrated", "plain"])
@pytest.mark.parametrize("build", BUILDS)
def test_the_ops_take_vllms_tensors_and_the_calibration_with_the_transforms_bits(
    dtype, calibrated, build, request
):
    """What the backend hands the ops (strided K/V views of the model's qkv, queries and an
    output in the model's dtype, the layer's calibration tables) stores the bytes and writes the
    outputs of the PyTorch transform + fp32 ops + copy into the output, bit for bit: moving that
    work into the ops changed no bit of the cache or of any output. A padding row past the last
    query gets zero attention (plus the offset), as before."""
    ops = request.getfixturevalue(build)
    num_heads, num_kv_heads, head_dim, block_size = 8, 2, 64, 16
    seq_lens = [40, 700, 9]  # a decode, a decode over two key segments, a prefill of 9
    starts = torch.tensor([0, 1, 2, 11], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    blocks = [-(-n // block_size) for n in seq_lens]
    table = torch.zeros(3, max(blocks), dtype=torch.int32)
    first = 0
    for r, n in enumerate(blocks):
        table[r, :n] = torch.arange(first, first + n)
        first += n
    slots = torch.cat([table[r, torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size
                       for r, n in enumerate(seq_lens)]).long()  # fmt: skip
    gen = torch.Generator().manual_seed(7)
    width = (num_heads + 2 * num_kv_heads) * head_dim  # vLLM's qkv: K and V are strided views of it
    qkv = (torch.randn(len(slots), width, generator=gen) * 3).to(dtype)
    key = qkv[:, num_heads * head_dim :][:, : num_kv_heads * head_dim].view(-1, num_kv_heads, head_dim)
    value = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(-1, num_kv_heads, head_dim)
    assert not key.is_contiguous()
    query = torch.randn(12, num_heads, head_dim, generator=gen).to(dtype)  # the last row: padding
    transform = _calibration(num_heads, num_kv_heads, head_dim, seed=3) if calibrated else None
    layout = format_for("nf4", head_dim)
    metadata = (starts, lens, table)

    before = torch.zeros(first, num_kv_heads, block_size, layout.cell_bytes, dtype=torch.uint8)
    k, v, q = (key, value, query) if transform is None else (
        transform.keys(key), transform.values(value), transform.queries(query))  # fmt: skip
    cpu_kernels.store(before, k, v, slots, layout, ops=ops)
    fp32 = cpu_kernels.attention(q, before, layout, *metadata, head_dim**-0.5, ops=ops)
    want = torch.empty_like(query)
    want[:] = fp32 if transform is None else transform.outputs(fp32)

    kernels = cpu_kernels.LayoutKernels(layout, ops)
    after = torch.zeros_like(before)
    kernels.store(after, key, value, slots, **(transform.store_tables(key.device) if transform else {}))
    got = torch.full_like(query, float("nan"))
    tables = transform.attention_tables(query.device) if transform else {}
    kernels.attention(query, after, *metadata, head_dim**-0.5, out=got, **tables)
    assert torch.equal(after, before)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert not got.isnan().any()


@pytest.mark.parametrize("build", BUILDS)
def test_a_query_gets_the_same_bits_however_it_is_batched(build, request):
    """Batch invariance, exact: what makes prefix-cache hits and chunked prefill reproduce a cold run.

    The same 150 query positions of one request are attended (a) as one
    prefill, (b) in chunks of 1/17/132 tokens (chunked prefill, or a hit on a
    cached prefix), (c) each alone as a decode, (d) batched with other
    requests; every row must be bit-identical.
    """
    ops = request.getfixturevalue(build)
    cache, table, layout = fill_cache([150, 300, 40], 3, 64, 16, seed=5, layout=format_for("nf4", 64))
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


# (head_dim, query heads, KV heads, sliding window) for contexts of several key segments:
# SmolLM2's shape (also with a window that starts inside a segment), Gemma-3's (one KV head,
# 4 query heads, 256 dims: value blocks in passes), Qwen2.5's 7 query heads a KV head (row
# passes), 8 a KV head at 128, and head_dim 80 (key groups of 10: scales change inside a
# dword; value groups of 40: the decode path decodes values through scratch).
LONG_CASES = [(64, 9, 3, None), (64, 9, 3, 1500), (256, 4, 1, None), (64, 14, 2, None), (128, 8, 1, None),
              (80, 4, 4, None)]
LONG_CONTEXT = 2600  # six segments of 512 keys (csrc/attention.cpp kKeySegment)


def _stored_cache(seq_lens, num_kv_heads, head_dim, seed, ops):
    """fill_cache through the C++ store (the reference's bytes, tested above): 2,600 tokens in seconds."""
    store = partial(cpu_kernels.store, ops=ops)
    return fill_cache(seq_lens, num_kv_heads, head_dim, 16, seed=seed, store=store)


@pytest.mark.parametrize("case", LONG_CASES)
@pytest.mark.parametrize("build", BUILDS)
def test_long_contexts_get_the_same_bits_however_their_segments_run(case, build, native, request):
    """Beyond 512 keys a query's softmax runs per key segment and the segments are folded in order.

    A prefill folds them inside one task (64 queries); a decode runs one task per segment, on
    whichever thread is free, and folds their partial states afterwards; a decode also scores
    and accumulates straight from the codes (AVX-512) instead of through scratch. The last 80
    positions of a 2,600-token request must get the same bits as one prefill chunk, each alone
    as a decode (one and two threads), and batched behind another request; and stay within the
    reference's tolerance.
    """
    head_dim, heads, kv_heads, window = case
    ops = request.getfixturevalue(build)
    seed = head_dim + heads
    cache, table, layout = _stored_cache([LONG_CONTEXT, 1500], kv_heads, head_dim, seed=seed, ops=native)
    first = LONG_CONTEXT - 80
    query = torch.randn(80, heads, head_dim, generator=torch.Generator().manual_seed(40))
    scale = head_dim**-0.5

    def run(q, starts, lens, rows):
        return cpu_kernels.attention(
            q, cache, layout, torch.tensor(starts), torch.tensor(lens), table[rows], scale,
            sliding_window=window, ops=ops,
        )

    chunk = run(query, [0, 80], [LONG_CONTEXT], [0])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            decodes = [run(query[i : i + 1], [0, 1], [first + i + 1], [0]) for i in range(0, 80, 9)]
            decodes = torch.cat(decodes)
            assert torch.equal(decodes, chunk[::9]), n
    finally:
        torch.set_num_threads(threads)
    other = torch.randn(30, heads, head_dim, generator=torch.Generator().manual_seed(41))
    batched = run(torch.cat([other, query[-1:]]), [0, 30, 31], [1500, LONG_CONTEXT], [1, 0])
    assert torch.equal(batched[30:], chunk[-1:])
    want = reference_in_model_space(
        query, cache, table[:1], layout, [0, 80], [LONG_CONTEXT], scale, window=window
    )
    torch.testing.assert_close(chunk.double(), want, atol=ATOL, rtol=RTOL)


def test_long_contexts_native_and_portable_builds_agree_bit_for_bit(avx512, portable):
    """The segment folds are one scalar loop in both builds; the decode path is AVX-512 only."""
    for head_dim, heads, kv_heads, window in LONG_CASES:
        cache, table, layout = _stored_cache([LONG_CONTEXT, 1500], kv_heads, head_dim, seed=7, ops=avx512)
        query = torch.randn(33, heads, head_dim, generator=torch.Generator().manual_seed(42))
        lens = torch.tensor([LONG_CONTEXT, 1500])
        args = (query, cache, layout, torch.tensor([0, 1, 33]), lens, table, 0.1)
        a = cpu_kernels.attention(*args, sliding_window=window, ops=avx512)
        b = cpu_kernels.attention(*args, sliding_window=window, ops=portable)
        assert torch.equal(a, b), (head_dim, heads, window, (a - b).abs().max())


@pytest.mark.parametrize("build", BUILDS)
def test_kv_heads_split_over_ranks_give_the_same_bits(build, request):
    """Tensor parallel: a rank holds the pages of its own KV heads and the queries that read them.

    Storing 4 KV heads in one cache, or 2 and 2 in two (what ranks 0 and 1 of
    ``--tensor-parallel-size 2`` hold), writes the same bytes per head, and
    attention over each half of the query heads (3 per KV head) gives the same
    bits as over all of them: no statistic of the format spans heads.
    """
    ops = request.getfixturevalue(build)
    layout = format_for("nf4", 64)
    key, value = _kv(70, 4, 64, seed=11)
    query = torch.randn(70, 12, 64, generator=torch.Generator().manual_seed(12))
    slots = torch.arange(70)
    starts, seq_lens, table = torch.tensor([0, 70]), torch.tensor([70]), torch.arange(5)[None]

    def cache_of(heads: slice) -> torch.Tensor:
        cache = torch.zeros(5, heads.stop - heads.start, 16, layout.cell_bytes, dtype=torch.uint8)
        k, v = key[:, heads].contiguous(), value[:, heads].contiguous()
        cpu_kernels.store(cache, k, v, slots, layout, ops=ops)
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


@pytest.mark.parametrize("groups", OTHER_GROUPS)
def test_other_group_sizes_match_the_reference(native, groups):
    """Group sizes other than the default take the decoders' other branches."""
    head_dim, key_group, value_group = groups
    layout = CellLayout(RowFormat(head_dim, key_group), RowFormat(head_dim, value_group))
    batch = _mixed_batch(head_dim, 8, 2, 16, seed=key_group, layout=layout)
    cache, table, layout, starts, seq_lens, query = batch
    args = (query, cache, layout, torch.tensor(starts), torch.tensor(seq_lens), table, head_dim**-0.5)
    got = cpu_kernels.attention(*args, ops=native)
    want = reference_in_model_space(query, cache, table, layout, starts, seq_lens, head_dim**-0.5)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL)


def test_native_and_portable_builds_agree_bit_for_bit(avx512, portable):
    cases = [(64, (9, 3), None, None), (128, (8, 2), 50, None), (80, (4, 4), None, None)]
    cases += [(d, (8, 2), None, (kg, vg)) for d, kg, vg in OTHER_GROUPS]
    for head_dim, heads, window, groups in cases:
        rows = (RowFormat(head_dim, groups[0]), RowFormat(head_dim, groups[1])) if groups else None
        layout = CellLayout(*rows) if rows else None
        batch = _mixed_batch(head_dim, *heads, 16, seed=head_dim, layout=layout)
        cache, table, layout, starts, seq_lens, query = batch
        args = (query, cache, layout, torch.tensor(starts), torch.tensor(seq_lens), table, head_dim**-0.5)
        a = cpu_kernels.attention(*args, sliding_window=window, ops=avx512)
        b = cpu_kernels.attention(*args, sliding_window=window, ops=portable)
        assert torch.equal(a, b), (head_dim, groups, (a - b).abs().max())


def test_cells_past_byte_2_to_the_31_are_stored_and_read_like_any_other(native, portable):
    """Index overflow: a cache of more than 2^31 bytes, read and written past that byte.

    Four blocks (one below 2^31, one across it, two beyond) hold one request; the C++ store
    writes the reference's bytes there, and attention over them gives the bits of attention
    over a small cache holding the same cells.
    """
    layout = format_for("nf4", 64)
    block_size, block_bytes = 16, 16 * layout.cell_bytes
    num_blocks = 2**31 // block_bytes + 4
    big = torch.empty(num_blocks, 1, block_size, layout.cell_bytes, dtype=torch.uint8)  # ~2.1 GB, untouched
    across = 2**31 // block_bytes  # starts below byte 2^31, ends above it
    blocks = torch.tensor([num_blocks - 1, 3, across, num_blocks - 2], dtype=torch.int32)
    assert int(blocks[0]) * block_bytes > 2**31
    assert (across + 1) * block_bytes > 2**31 > across * block_bytes
    seq_len = block_size * len(blocks)
    key, value = _kv(seq_len, 1, 64, seed=31, dtype=torch.float32)
    positions = torch.arange(seq_len)
    big_slots = blocks.long()[positions // block_size] * block_size + positions % block_size
    small = torch.zeros(len(blocks), 1, block_size, layout.cell_bytes, dtype=torch.uint8)
    reference.write_paged(small, key, value, positions, layout)
    query = torch.randn(seq_len + 1, 4, 64, generator=torch.Generator().manual_seed(32))
    # a prefill, then a decode
    starts, lens = torch.tensor([0, seq_len, seq_len + 1]), torch.tensor([seq_len, seq_len])
    for ops in (native, portable):
        cpu_kernels.store(big, key, value, big_slots, layout, ops=ops)
        assert torch.equal(big[blocks.long()], small)
        big_table = blocks[None].repeat(2, 1)
        got = cpu_kernels.attention(query, big, layout, starts, lens, big_table, 0.125, ops=ops)
        small_table = torch.arange(len(blocks), dtype=torch.int32)[None].repeat(2, 1)
        want = cpu_kernels.attention(query, small, layout, starts, lens, small_table, 0.125, ops=ops)
        assert torch.equal(got, want)


def test_switch_forces_the_pytorch_path(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert not cpu_kernels.available()
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1")
    assert cpu_kernels.available()
