"""The NF4 format and its pure-torch reference codec, tested against the math.

Covers: the NF4 table (literally, and against bitsandbytes' construction), the
ue5m3 scale code (value, round trip, ceil property), nibble order, group and
row round trips with error bounds, hypothesis properties over shapes, dtypes and
magnitudes, non-finite and degenerate input, bad input, and the paged
write/read reference (negative slots included).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_nf4kv import format as fmt
from vllm_nf4kv import reference as ref
from vllm_nf4kv.rotation import rotate, rotation_matrix, unrotate

HEAD_DIMS = [16, 32, 48, 64, 96, 128, 256]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# the table as bitsandbytes 0.50 hard-codes it (functional.py, get_4bit_type("nf4"))
BNB_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
# largest distance from a value in [-1, 1] to its nearest level: half the widest gap (-1 .. -0.696)
NF4_HALF_GAP = max(b - a for a, b in zip(BNB_NF4[:-1], BNB_NF4[1:], strict=True)) / 2
CEIL_SLACK = 1 + 1 / 8  # a ceil ue5m3 code exceeds its scale by at most one mantissa step


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> torch.Tensor:
    """bitsandbytes' ``create_normal_map`` with ``scipy.stats.norm.ppf`` -> ``Normal.icdf`` (float64)."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)

    def ppf(p: torch.Tensor) -> list[float]:  # bitsandbytes: torch.linspace (float32) fed to scipy (float64)
        return normal.icdf(p.to(torch.float64)).tolist()

    assert use_extra_value
    v1 = ppf(torch.linspace(offset, 0.5, 9)[:-1])  # 8 positive levels
    v2 = [0.0] * (256 - 15)
    v3 = [-x for x in ppf(torch.linspace(offset, 0.5, 8)[:-1])]  # 7 negative levels
    values = torch.tensor(v1 + v2 + v3, dtype=torch.float32).sort().values
    return values / values.max()


# ---------------------------------------------------------------- constants


def test_nf4_table_literal():
    assert list(fmt.NF4_LEVELS) == BNB_NF4
    assert fmt.NF4_LEVELS[fmt.NF4_ZERO_CODE] == 0.0
    assert list(ref.nf4_levels()) == BNB_NF4  # exactly representable in fp32


def test_nf4_table_matches_bitsandbytes_construction():
    built = torch.unique(create_normal_map())
    assert built.numel() == 16
    # Exact: the float64 icdf rounds to the same fp32 values scipy's ppf gives bitsandbytes.
    assert torch.equal(built, ref.nf4_levels())


def test_midpoints_are_between_levels():
    levels, mids = ref.nf4_levels(), ref.nf4_midpoints()
    assert mids.shape == (15,)
    assert bool(((levels[:-1] < mids) & (mids < levels[1:])).all())
    # every level encodes to itself
    assert torch.equal(ref.nf4_encode(levels), torch.arange(16, dtype=torch.uint8))


def test_default_layout_numbers():
    layout = fmt.format_for("nf4", 64)
    key, value = layout.key, layout.value
    assert (key.group_size, key.scale_scheme, key.relative_bits) == (8, fmt.ScaleScheme.TWO_LEVEL, 5)
    assert (value.group_size, value.scale_scheme) == (32, fmt.ScaleScheme.UE5M3_PER_GROUP)
    # K: 32 code bytes, a row code, 8 x 5 bits; V: 32 code bytes, 2 ue5m3 codes
    offsets = (key.code_offset, key.scale_offset, key.scale_bytes, layout.value_offset, layout.cell_bytes)
    assert offsets == (0, 32, 6, 38, 72)
    assert (key.search_steps, value.search_steps) == (8, 4)
    assert layout.bits_per_value == 4.5
    assert fmt.format_for("nf4", 128).cell_bytes == 136 and fmt.format_for("nf4", 128).bits_per_value == 4.25
    assert fmt.format_for("nf4", 256).cell_bytes == 264  # int4_per_token_head's bytes at every size
    assert (key.spec, value.spec) == ("nf4-g8-r5-s8", "nf4-g32-ue5m3-s4")


def test_relative_ladder():
    ladder = fmt.relative_ladder(5)
    assert len(ladder) == 32 and ladder[0] == 1.0
    assert all(a > b for a, b in zip(ladder, ladder[1:], strict=False))
    assert ladder[16] == 0.5 and abs(ladder[-1] - 2 ** (-31 / 16)) < 1e-7
    assert fmt.relative_ladder(1) == (1.0, 0.5)
    with pytest.raises(ValueError, match="relative_bits"):
        fmt.relative_ladder(9)
    with pytest.raises(ValueError, match="two-level row needs relative_bits"):
        fmt.RowFormat(64, 8, scale_scheme=fmt.ScaleScheme.TWO_LEVEL)
    with pytest.raises(ValueError, match="relative_bits is for two-level rows only"):
        fmt.RowFormat(64, 8, relative_bits=5)


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_pack_bits_round_trip_lsb_first(bits):
    codes = torch.randint(0, 2**bits, (7, 11), generator=torch.Generator().manual_seed(bits))
    packed = ref.pack_bits(codes, bits)
    assert packed.shape == (7, -(-11 * bits // 8))
    assert torch.equal(ref.unpack_bits(packed, 11, bits), codes)
    # code j sits at bits bits*j .. of the little-endian bytes
    one = ref.pack_bits(torch.tensor([0, 1]), bits)
    assert int.from_bytes(bytes(one.tolist()), "little") == 1 << bits


def test_two_level_scales_cover_and_search():
    row = fmt.RowFormat(64, 8, search_steps=1, scale_scheme=fmt.ScaleScheme.TWO_LEVEL, relative_bits=5)
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(1)) * torch.rand(500, 1) * 10
    x[0] = 0
    stored = ref.quantize_rows(x, row)
    scales = ref.group_scales(stored, row)
    absmax = x.abs().unflatten(-1, (8, 8)).amax(-1)
    row_scale = ref.decode_scale(stored[:, row.scale_offset])
    assert bool((row_scale >= x.abs().amax(-1)).all()) and float(row_scale[0]) == 0.0
    # one search step: the smallest rung that still covers each group (no clipping)
    assert bool((scales >= absmax).all())
    relative = ref.unpack_bits(stored[:, row.scale_offset + 1 :], 8, 5)
    smaller = row_scale[:, None] * ref.relative_ladder(5)[(relative + 1).clamp_max(31)]
    assert bool(((smaller < absmax) | (relative == 31)).all())
    # more steps never raise the error of any group
    searched = dataclasses.replace(row, search_steps=8)

    def err(r):
        return ((ref.decode_rows_rotated(ref.quantize_rows(x, r), r) - x) ** 2).unflatten(-1, (8, 8)).sum(-1)

    assert bool((err(searched) <= err(row) + 1e-6).all())
    assert float(err(searched).sum()) < float(err(row).sum())


def test_registry_names_what_each_dtype_stores():
    with pytest.raises(ValueError, match="no nf4kv cell format for kv_cache_dtype 'fp8'"):
        fmt.format_for("fp8", 64)
    with pytest.raises(ValueError, match="search_steps must be >= 1"):
        fmt.RowFormat(64, 16, search_steps=0)
    with pytest.raises(ValueError, match="head_dim"):
        fmt.CellLayout(fmt.RowFormat(64, 16), fmt.RowFormat(128, 32))
    split = fmt.CellLayout(fmt.RowFormat(128, 16, search_steps=8), fmt.RowFormat(128, 32, search_steps=1))
    assert (split.value_offset, split.cell_bytes) == (64 + 8, 64 + 8 + 64 + 4)


def vllm_int4_per_token_head_cell(head_dim: int) -> int:
    """K + V bytes per token and KV head that vLLM's own int4_per_token_head spec asks for."""
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode

    spec = FullAttentionSpec(
        block_size=16, num_kv_heads=1, head_size=head_dim, dtype=torch.uint8,
        kv_quant_mode=KVQuantMode.INT4_PER_TOKEN_HEAD,
    )  # fmt: skip
    return TritonAttentionBackend.customize_spec(spec).state_content_bytes


@pytest.mark.parametrize("head_dim", range(16, 513, 16))
def test_never_more_bytes_than_vllms_int4_per_token_head(head_dim):
    vllm_cell = vllm_int4_per_token_head_cell(head_dim)
    assert 2 * fmt.int4_per_token_head_bytes(head_dim) == vllm_cell  # our figure is vLLM's (tools, docs)
    assert fmt.format_for("nf4", head_dim).cell_bytes <= vllm_cell


# ---------------------------------------------------------------- ue5m3 scale codes

ALL_CODES = torch.arange(256, dtype=torch.int32)


def test_scale_code_values():
    decoded = ref.decode_scale(ALL_CODES)
    assert decoded.tolist() == [fmt.scale_code_value(c) for c in range(256)]
    # code 1 is exponent 0, mantissa 1: mantissa 0 of exponent 0 would be code 0, which is zero
    assert decoded[0] == 0.0 and decoded[1] == (1 + 1 / 8) * 2.0**-16 and decoded[255] == fmt.SCALE_MAX
    assert bool((decoded[1:] > decoded[:-1]).all()), "codes must be strictly increasing"
    with pytest.raises(ValueError):
        fmt.scale_code_value(256)


def test_scale_min_is_the_smallest_code_value():
    assert fmt.scale_code_value(fmt.SCALE_CODE_MIN) == fmt.SCALE_MIN


def test_scale_code_round_trip():
    assert torch.equal(ref.encode_scale_ceil(ref.decode_scale(ALL_CODES)), ALL_CODES)


def test_scale_code_clamps():
    scales = torch.tensor([0.0, 1e-30, fmt.SCALE_MIN / 2, fmt.SCALE_MAX * 2, 1e38, float("inf")])
    assert ref.encode_scale_ceil(scales).tolist() == [0, 1, 1, 255, 255, 255]


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=fmt.SCALE_MIN, max_value=fmt.SCALE_MAX, allow_subnormal=False, width=32))
def test_scale_code_is_the_ceil(scale):
    code = int(ref.encode_scale_ceil(torch.tensor([scale]))[0])
    assert fmt.scale_code_value(code) >= scale
    assert code == 1 or fmt.scale_code_value(code - 1) < scale
    assert fmt.scale_code_value(code) <= scale * CEIL_SLACK


# ---------------------------------------------------------------- nibbles


def test_nibble_order_even_index_high():
    codes = torch.tensor([1, 2, 15, 0, 7, 8], dtype=torch.uint8)
    assert ref.pack_nibbles(codes).tolist() == [0x12, 0xF0, 0x78]
    assert torch.equal(ref.unpack_nibbles(ref.pack_nibbles(codes)), codes)


def test_nibble_round_trip_all_pairs():
    codes = torch.cartesian_prod(torch.arange(16), torch.arange(16)).flatten().to(torch.uint8)
    packed = ref.pack_nibbles(codes)
    assert torch.equal(packed, torch.arange(256, dtype=torch.uint8))
    assert torch.equal(ref.unpack_nibbles(packed), codes)


def test_pack_needs_even_count():
    with pytest.raises(ValueError, match="even"):
        ref.pack_nibbles(torch.zeros(3, dtype=torch.uint8))


# ---------------------------------------------------------------- groups


@pytest.mark.parametrize("search_steps", [1, 4])
def test_representable_groups_round_trip_exactly(search_steps):
    generator = torch.Generator().manual_seed(1)
    scale_codes = torch.randint(1, 256, (50, 4), generator=generator, dtype=torch.int32)
    codes = torch.randint(0, 16, (50, 4, 16), generator=generator)
    codes[..., 0] = 15  # absmax == scale, so the ceil code is the scale itself
    x = ref.nf4_levels()[codes] * ref.decode_scale(scale_codes)[..., None]
    got_codes, got_scales = ref.quantize_groups(x.flatten(-2), 16, search_steps)
    assert torch.equal(got_scales.int(), scale_codes)
    assert torch.equal(got_codes, codes.flatten(-2).to(torch.uint8))
    assert torch.equal(ref.dequantize_groups(got_codes, got_scales, 16), x.flatten(-2))


@pytest.mark.parametrize("group", [16, 32, 64])
def test_group_error_bound_and_search_never_hurts(group):
    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(2)) * 3
    groups = x.unflatten(-1, (-1, group))
    errors = {}
    for steps in (1, 4):
        codes, scales = ref.quantize_groups(x, group, steps)
        diff = (ref.dequantize_groups(codes, scales, group) - x).unflatten(-1, (-1, group))
        errors[steps] = (diff**2).sum(-1)
    # s1 never clips: every value is within half a level gap of the ceil scale
    codes, scales = ref.quantize_groups(x, group, 1)
    err = (ref.dequantize_groups(codes, scales, group) - x).abs().unflatten(-1, (-1, group))
    bound = NF4_HALF_GAP * CEIL_SLACK * groups.abs().amax(-1, keepdim=True)
    assert bool((err <= bound * (1 + 1e-6)).all())
    # the search keeps the least squared error, the ceil code included
    assert bool((errors[4] <= errors[1]).all())
    assert float(errors[4].mean()) < float(errors[1].mean())


def test_all_zero_group():
    x = torch.zeros(3, 64)
    x[1, 16:32] = torch.linspace(-1, 1, 16)  # only group 1 of row 1 is non-zero
    codes, scales = ref.quantize_groups(x, 16)
    assert scales[0].tolist() == [0, 0, 0, 0] and scales[1].tolist()[0] == 0 and scales[1, 1] > 0
    assert bool((codes[0] == fmt.NF4_ZERO_CODE).all())
    assert torch.equal(ref.dequantize_groups(codes, scales, 16)[0], torch.zeros(64))
    row = fmt.RowFormat(64, 16)
    assert torch.equal(ref.fake_quantize_rows(torch.zeros(5, 64), row), torch.zeros(5, 64))


# ---------------------------------------------------------------- rows


def _round_trip(x: torch.Tensor, row: fmt.RowFormat) -> torch.Tensor:
    return unrotate(ref.decode_rows_rotated(ref.encode_rows(x, row), row))


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_rotation_is_orthogonal(head_dim):
    x = torch.randn(10, head_dim)
    torch.testing.assert_close(unrotate(rotate(x)), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotate(x).norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [16, 64, 96, 256])
def test_rotation_butterflies_compute_the_defined_matrix(head_dim):
    """``rotate`` is ``x @ R`` with ``R = diag(signs) blockdiag(H)``, and ``unrotate`` is ``x @ R^T``."""
    x = torch.randn(5, head_dim, dtype=torch.float64)
    matrix = rotation_matrix(head_dim)
    torch.testing.assert_close(rotate(x, torch.float64), x @ matrix, atol=1e-12, rtol=0)
    torch.testing.assert_close(unrotate(x, torch.float64), x @ matrix.T, atol=1e-12, rtol=0)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_row_round_trip_quality(head_dim):
    row = fmt.format_for("nf4", head_dim).key
    x = torch.randn(4096, head_dim, generator=torch.Generator().manual_seed(3))
    x[:, :3] *= 20  # outlier channels: the rotation must spread them
    rows = ref.encode_rows(x, row)
    assert rows.dtype == torch.uint8 and rows.shape == (4096, row.row_bytes)
    y = _round_trip(x, row)
    rel_mse = float(((y - x) ** 2).mean() / (x**2).mean())
    cosine = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    assert rel_mse < 0.012
    assert float(cosine.min()) > 0.98
    # fake_quantize_rows is the same round trip, in the input dtype
    assert torch.equal(ref.fake_quantize_rows(x, row), y)


def _row_error_bound(x: torch.Tensor, row: fmt.RowFormat) -> torch.Tensor:
    """L2 bound per row: every rotated value within half a gap of its ceil-scaled level."""
    groups = rotate(ref.sanitize(x)).unflatten(-1, (-1, row.group_size))
    per_group = NF4_HALF_GAP * CEIL_SLACK * groups.abs().amax(-1)
    return (per_group**2 * row.group_size).sum(-1).sqrt()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    head_dim=st.sampled_from(HEAD_DIMS),
    dtype=st.sampled_from(DTYPES),
    log_scale=st.floats(-3, 3),
    seed=st.integers(0, 2**16),
)
def test_row_properties(lead, head_dim, dtype, log_scale, seed):
    row = fmt.format_for("nf4", head_dim).key
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, head_dim, generator=generator) * 10.0**log_scale).to(dtype)
    rows = ref.encode_rows(x, row)
    assert rows.shape == (*lead, row.row_bytes) and rows.dtype == torch.uint8
    assert torch.equal(rows, ref.encode_rows(x, row)), "encoding must be deterministic"
    codes = ref.unpack_nibbles(rows[..., : row.code_bytes])
    assert int(codes.max()) <= 15 if codes.numel() else True
    y = ref.decode_rows_rotated(rows, row)
    assert y.dtype == torch.float32 and bool(torch.isfinite(y).all())
    # s1 obeys the per-value bound; the search only lowers each group's error
    err1 = (_round_trip(x, dataclasses.replace(row, search_steps=1)) - x.float()).norm(dim=-1)
    err = (unrotate(y) - x.float()).norm(dim=-1)
    bound = _row_error_bound(x, row) * (1 + 1e-4) + 1e-6 * x.float().abs().amax() * head_dim
    assert bool((err1 <= bound).all())
    assert bool((err <= err1 * (1 + 1e-4) + 1e-6 * float(x.float().abs().max()) * head_dim).all())
    fq = ref.fake_quantize_rows(x, row)
    assert fq.dtype == dtype and fq.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_very_large_values_stay_finite(dtype):
    row = fmt.RowFormat(64, 16)
    big = torch.finfo(dtype).max
    x = torch.randn(8, 64).to(dtype)
    x[0] = big / 2
    x[1, 5] = -big / 2
    y = ref.decode_rows_rotated(ref.encode_rows(x, row), row)
    assert bool(torch.isfinite(y).all())
    # rotated values beyond the largest scale saturate at +-SCALE_MAX (defined, finite)
    assert float(y.abs().max()) == fmt.SCALE_MAX
    torch.testing.assert_close(unrotate(y)[2:], _round_trip(x[2:], row))  # other rows untouched


def test_non_finite_input_has_defined_result():
    row = fmt.RowFormat(64, 16)
    x = torch.randn(4, 64)
    bad = x.clone()
    bad[1, 3] = float("nan")
    bad[2, 7] = float("inf")
    bad[3, 9] = -float("inf")
    rows = ref.encode_rows(bad, row)
    y = unrotate(ref.decode_rows_rotated(rows, row))
    assert bool(torch.isfinite(y).all())
    assert torch.equal(rows[0], ref.encode_rows(x[:1], row)[0]), "a bad row must not affect other rows"
    nan_as_zero = x[1:2].clone()
    nan_as_zero[0, 3] = 0.0
    assert torch.equal(rows[1], ref.encode_rows(nan_as_zero, row)[0]), "NaN is stored as 0"
    assert float(y[2, 7]) > 0.5 * fmt.SCALE_MAX and float(y[3, 9]) < -0.5 * fmt.SCALE_MAX
    assert torch.equal(ref.fake_quantize_rows(torch.full((2, 64), float("nan")), row), torch.zeros(2, 64))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("head_dim", [0, 8, 40, 72 + 4, -16])
def test_head_dim_must_be_multiple_of_16(head_dim):
    with pytest.raises(ValueError, match="multiple of 16"):
        fmt.check_head_dim(head_dim)
    with pytest.raises(ValueError, match="auto or fp8"):
        fmt.format_for("nf4", head_dim)


def test_bad_row_formats():
    with pytest.raises(ValueError, match="divide"):
        fmt.RowFormat(64, 24)
    with pytest.raises(ValueError, match="divide"):
        fmt.RowFormat(64, 1)


def test_bad_codec_input():
    row = fmt.RowFormat(64, 16)
    with pytest.raises(TypeError, match="floating"):
        ref.encode_rows(torch.zeros(2, 64, dtype=torch.int32), row)
    with pytest.raises(ValueError, match="head_dim=64"):
        ref.encode_rows(torch.zeros(2, 32), row)
    with pytest.raises(ValueError, match="head_dim=64"):
        ref.encode_rows(torch.tensor(1.0), row)
    with pytest.raises(ValueError, match="uint8"):
        ref.decode_rows_rotated(torch.zeros(2, 36), row)
    with pytest.raises(ValueError, match="uint8"):
        ref.decode_rows_rotated(torch.zeros(2, 35, dtype=torch.uint8), row)
    with pytest.raises(ValueError, match="search_steps"):
        ref.quantize_groups(torch.zeros(2, 64), 16, 0)
    with pytest.raises(ValueError, match="multiple of group_size"):
        ref.quantize_groups(torch.zeros(2, 60), 16)


# ---------------------------------------------------------------- paged cache

NUM_KV_HEADS = 3


def _empty_cache(layout: fmt.CellLayout, num_blocks: int, block_size: int) -> torch.Tensor:
    return torch.full((num_blocks, NUM_KV_HEADS, block_size, layout.cell_bytes), 0xAB, dtype=torch.uint8)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 128])
def test_paged_write_read(head_dim, block_size):
    layout = fmt.format_for("nf4", head_dim)
    generator = torch.Generator().manual_seed(4)
    seq_len, num_blocks = 3 * block_size - 5, 9
    key = torch.randn(seq_len, NUM_KV_HEADS, head_dim, generator=generator).to(torch.bfloat16)
    value = torch.randn(seq_len, NUM_KV_HEADS, head_dim, generator=generator).to(torch.bfloat16)
    block_table = torch.tensor([7, 2, 5])
    positions = torch.arange(seq_len)
    slots = block_table[positions // block_size] * block_size + positions % block_size
    cache = _empty_cache(layout, num_blocks, block_size)
    ref.write_paged(cache, key, value, slots, layout)
    got_k, got_v = ref.read_paged(cache, block_table, seq_len, layout)
    assert got_k.shape == (seq_len, NUM_KV_HEADS, head_dim)
    assert torch.equal(got_k, ref.decode_rows_rotated(ref.encode_rows(key, layout.key), layout.key))
    assert torch.equal(got_v, ref.decode_rows_rotated(ref.encode_rows(value, layout.value), layout.value))
    # untouched blocks keep their bytes
    for block in set(range(num_blocks)) - {7, 2, 5}:
        assert bool((cache[block] == 0xAB).all())
    # the cell layout: K row at key_offset, V row at value_offset
    first = cache[7, :, 0]
    assert torch.equal(first[:, : layout.value_offset], ref.encode_rows(key[0], layout.key))
    assert torch.equal(first[:, layout.value_offset :], ref.encode_rows(value[0], layout.value))


def test_paged_negative_slots_are_skipped():
    layout = fmt.format_for("nf4", 64)
    cache = _empty_cache(layout, 4, 16)
    key = torch.randn(6, NUM_KV_HEADS, 64)
    slots = torch.tensor([0, -1, 17, -1, 63, -5])
    ref.write_paged(cache, key, -key, slots, layout)
    written = {0: 0, 17: 2, 63: 4}
    for slot, token in written.items():
        key_row = cache[slot // 16, :, slot % 16, : layout.value_offset]
        assert torch.equal(key_row, ref.encode_rows(key[token], layout.key))
    untouched = torch.ones(4, 16, dtype=torch.bool)
    for slot in written:
        untouched[slot // 16, slot % 16] = False
    assert bool((cache.transpose(1, 2)[untouched] == 0xAB).all())
    before = cache.clone()
    ref.write_paged(cache, key, key, torch.full((6,), -1), layout)  # all padding: a no-op
    assert torch.equal(cache, before)


def test_paged_large_block_index():
    layout = fmt.format_for("nf4", 64)
    num_blocks, block_size = 20000, 16
    cache = torch.zeros(num_blocks, 1, block_size, layout.cell_bytes, dtype=torch.uint8)
    key = torch.randn(2, 1, 64)
    slots = torch.tensor([(num_blocks - 1) * block_size + 15, 3])
    ref.write_paged(cache, key, key, slots, layout)
    got_k, _ = ref.read_paged(cache, torch.tensor([num_blocks - 1]), block_size, layout)
    assert torch.equal(got_k[15], ref.decode_rows_rotated(ref.encode_rows(key[0], layout.key), layout.key))


def test_paged_bad_input():
    layout = fmt.format_for("nf4", 64)
    cache = _empty_cache(layout, 2, 16)
    key = torch.randn(2, NUM_KV_HEADS, 64)
    with pytest.raises(ValueError, match="uint8"):
        ref.write_paged(cache.float(), key, key, torch.tensor([0, 1]), layout)
    with pytest.raises(ValueError, match="72"):
        ref.write_paged(cache[..., :70], key, key, torch.tensor([0, 1]), layout)
    with pytest.raises(ValueError, match="num_tokens"):
        ref.write_paged(cache, key, key[:, :2], torch.tensor([0, 1]), layout)
    with pytest.raises(ValueError, match="num_tokens"):
        ref.write_paged(cache, key[:, :2], key[:, :2], torch.tensor([0, 1]), layout)


