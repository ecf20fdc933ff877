"""Triton pieces of the NF4 codec shared by the store, load and attention kernels.

Each helper mirrors one function of :mod:`vllm_nf4kv.reference` operation for
operation, so results are bit-identical:

* :func:`encode_scale_ceil` / :func:`decode_scale`: integer operations on the fp32
  bit pattern (``reference.encode_scale_ceil`` / ``reference.decode_scale``);
* :func:`dequant_pairs`: ``level * scale`` in fp32 (``reference.decode_rows_rotated``), the
  scale decoded per the row's :class:`~vllm_nf4kv.format.ScaleScheme` by :func:`group_scale`
  (``reference.group_scales``);
* :func:`fp32_to_bf16_bits`: round-to-nearest-even done with integer operations,
  because the Triton interpreter truncates fp32 -> bf16 casts (the GPU rounds).

Tiles are split by nibble: a packed byte ``j`` of a row holds element ``2j`` in its
high nibble and ``2j + 1`` in its low one (:mod:`vllm_nf4kv.format`), so the
kernels work on an "even" tile and an "odd" tile of ``head_dim / 2`` columns each
and never interleave registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_nf4kv import format as fmt
from vllm_nf4kv.kernel_limits import CUDA_LIMITS
from vllm_nf4kv.reference import nf4_levels, nf4_midpoints, relative_ladder

# Every constant as a constexpr built from vllm_nf4kv.format (none is retyped here).
_FP32_MANTISSA_BITS: tl.constexpr = tl.constexpr(fmt.FP32_MANTISSA_BITS)
_FP32_EXP_BIAS: tl.constexpr = tl.constexpr(fmt.FP32_EXP_BIAS)
_SCALE_MANT_BITS: tl.constexpr = tl.constexpr(fmt.SCALE_MANTISSA_BITS)
_SCALE_MANT_MASK: tl.constexpr = tl.constexpr(fmt.SCALE_MANTISSA_MASK)
_DROPPED_BITS: tl.constexpr = tl.constexpr(fmt.SCALE_DROPPED_BITS)
_FP32_MANTISSA_MASK: tl.constexpr = tl.constexpr((1 << fmt.FP32_MANTISSA_BITS) - 1)
_ROUND_UP: tl.constexpr = tl.constexpr((1 << fmt.SCALE_DROPPED_BITS) - 1)  # ceil on the dropped bits
_SCALE_BIAS: tl.constexpr = tl.constexpr(fmt.SCALE_EXP_BIAS)
_SCALE_CODE_MIN: tl.constexpr = tl.constexpr(fmt.SCALE_CODE_MIN)
_SCALE_CODE_MAX: tl.constexpr = tl.constexpr(fmt.SCALE_CODE_MAX)
_SCALE_MAX: tl.constexpr = tl.constexpr(fmt.SCALE_MAX)
CODE_BITS: tl.constexpr = tl.constexpr(fmt.CODE_BITS)
CODE_MASK: tl.constexpr = tl.constexpr(fmt.CODE_MASK)
NUM_LEVELS: tl.constexpr = tl.constexpr(fmt.NUM_LEVELS)
NUM_MIDPOINTS: tl.constexpr = tl.constexpr(fmt.NUM_MIDPOINTS)

_TABLES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def nf4_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 16 NF4 levels and 15 midpoints as fp32 on ``device`` (built by the reference)."""
    key = str(device)
    tables = _TABLES.get(key)
    if tables is None:
        tables = (nf4_levels(device).contiguous(), nf4_midpoints(device).contiguous())
        _TABLES[key] = tables
    return tables


def require_scheme(layout: fmt.CellLayout) -> None:
    """Refuse rows whose scale scheme these kernels do not implement (``CUDA_LIMITS.scale_schemes``,
    the list selection refuses models by), so a scheme added to the format is never misread here.

    A kernel learns a row's scheme from its ``RELATIVE_BITS`` constexpr (:func:`relative_bits`).
    """
    for name, row in (("key", layout.key), ("value", layout.value)):
        if row.scale_scheme not in CUDA_LIMITS.scale_schemes:
            raise NotImplementedError(f"the Triton kernels have no {row.scale_scheme} {name} rows yet")


def relative_bits(row: fmt.RowFormat) -> int:
    """The ``RELATIVE_BITS`` constexpr of a row: ``B`` of a TWO_LEVEL row, 0 for per-group ue5m3.

    One integer carries the scheme so a kernel specializes on it at compile time (the
    per-group path compiles exactly as before the two-level scheme existed).
    """
    if row.scale_scheme is fmt.ScaleScheme.TWO_LEVEL:
        return row.relative_bits
    if row.scale_scheme is fmt.ScaleScheme.UE5M3_PER_GROUP:
        return 0
    raise NotImplementedError(f"the Triton kernels have no {row.scale_scheme} rows yet")


def cell_reader_constexprs(layout: fmt.CellLayout) -> dict[str, int]:
    """The constexprs a kernel that reads cells passes on to :func:`dequant_pairs` for K and V."""
    return {
        "VALUE_OFFSET": layout.value_offset,
        "K_GROUP": layout.key.group_size,
        "K_SCALE_OFFSET": layout.key.scale_offset,
        "K_RELATIVE_BITS": relative_bits(layout.key),
        "V_GROUP": layout.value.group_size,
        "V_SCALE_OFFSET": layout.value.scale_offset,
        "V_RELATIVE_BITS": relative_bits(layout.value),
    }


def ladder_table(row: fmt.RowFormat, device: torch.device) -> torch.Tensor:
    """The fp32 ladder a TWO_LEVEL row's kernel multiplies the row scale by (``reference.relative_ladder``).

    Handed to the kernels as a table, never recomputed there with ``exp2``, so every
    implementation multiplies by the same fp32 values. A per-group row reads no ladder;
    it gets the NF4 levels as a placeholder pointer (a kernel argument must be a tensor).
    """
    if row.scale_scheme is fmt.ScaleScheme.TWO_LEVEL:
        return relative_ladder(row.relative_bits, device)
    return nf4_tables(device)[0]


def check_head_table(
    name: str, table: torch.Tensor | None, num_heads: int, head_dim: int, device: torch.device
) -> None:
    """A per-head calibration table (``[num_heads, head_dim]``, contiguous fp32, on ``device``) or None."""
    if table is None:
        return
    if (
        table.dtype != torch.float32
        or tuple(table.shape) != (num_heads, head_dim)
        or not table.is_contiguous()
        or table.device != device
    ):
        raise ValueError(
            f"{name} must be a contiguous float32 [{num_heads}, {head_dim}] tensor on {device}, got "
            f"{table.dtype} {tuple(table.shape)} on {table.device}"
        )


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def alignment(*values: int) -> int:
    """Largest power of two (<= 16) dividing every value: a ``tl.multiple_of`` hint."""
    align = 16
    for v in values:
        while v % align:
            align //= 2
    return align


# ---------------------------------------------------------------- scale codes


@triton.jit
def encode_scale_ceil(absmax):
    """Smallest ue5m3 code >= ``absmax`` (>= 0), int32; 0 for 0 (``reference.encode_scale_ceil``)."""
    scale = tl.minimum(absmax, _SCALE_MAX)
    bits = scale.to(tl.int32, bitcast=True)
    exponent = (bits >> _FP32_MANTISSA_BITS) - _FP32_EXP_BIAS + _SCALE_BIAS
    mantissa = ((bits & _FP32_MANTISSA_MASK) + _ROUND_UP) >> _DROPPED_BITS
    code = (exponent << _SCALE_MANT_BITS) + mantissa  # a mantissa carry bumps the exponent
    code = tl.minimum(tl.maximum(code, _SCALE_CODE_MIN), _SCALE_CODE_MAX)
    return tl.where(scale > 0, code, 0)


@triton.jit
def decode_scale(code):
    """fp32 value of int32 ue5m3 codes, built from bits; code 0 is 0.0 (``reference.decode_scale``)."""
    exponent = (code >> _SCALE_MANT_BITS) - _SCALE_BIAS + _FP32_EXP_BIAS
    bits = (exponent << _FP32_MANTISSA_BITS) | ((code & _SCALE_MANT_MASK) << _DROPPED_BITS)
    return tl.where(code > 0, bits.to(tl.float32, bitcast=True), 0.0)


# ---------------------------------------------------------------- tiles


@triton.jit
def group_scale(
    row_ptrs,  # [TILE_N] pointers to the first byte of a K or V row (uint8)
    mask_n,  # [TILE_N] bool, rows to read
    group,  # [1, C] int32: the scale group of each column
    mask,  # [TILE_N, C] bool, entries to read (within mask_n)
    ladder_ptr,  # [2**RELATIVE_BITS] fp32 relative ladder (unread when RELATIVE_BITS == 0)
    SCALE_OFFSET: tl.constexpr,  # RowFormat.scale_offset: first scale byte of the row
    RELATIVE_BITS: tl.constexpr,  # 0: one ue5m3 byte a group; B: TWO_LEVEL with B-bit codes
):
    """fp32 scale ``[TILE_N, C]`` of each entry's group (``reference.group_scales``); masked: 0.

    TWO_LEVEL: ``decode_scale(row code) * ladder[k]``, one fp32 multiply, where ``k`` is the
    ``RELATIVE_BITS``-bit field at bit ``RELATIVE_BITS * group`` of the little-endian bytes
    after the row code (LSB first). A field spans at most two bytes (``RELATIVE_BITS <= 8``);
    the second is read only where the field reaches into it.
    """
    if RELATIVE_BITS == 0:
        scale_code = tl.load(row_ptrs[:, None] + (SCALE_OFFSET + group), mask=mask, other=0)
        scale = decode_scale(scale_code.to(tl.int32))
    else:
        row_code = tl.load(row_ptrs + SCALE_OFFSET, mask=mask_n, other=0)
        bit = group * RELATIVE_BITS
        shift = bit % 8
        byte_ptrs = row_ptrs[:, None] + (SCALE_OFFSET + 1 + bit // 8)  # + 1: past the row code
        low = tl.load(byte_ptrs, mask=mask, other=0).to(tl.int32)
        high = tl.load(byte_ptrs + 1, mask=mask & (shift + RELATIVE_BITS > 8), other=0).to(tl.int32)
        k = ((low | (high << 8)) >> shift) & ((1 << RELATIVE_BITS) - 1)
        scale = decode_scale(row_code.to(tl.int32))[:, None] * tl.load(ladder_ptr + k)
    return scale


@triton.jit
def dequant_pairs(
    row_ptrs,  # [TILE_N] pointers to the first byte of a K or V row (uint8)
    mask_n,  # [TILE_N] bool, rows to read
    levels_ptr,  # [NUM_LEVELS] fp32 NF4 levels
    ladder_ptr,  # [2**RELATIVE_BITS] fp32 relative ladder (unread when RELATIVE_BITS == 0)
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    SCALE_OFFSET: tl.constexpr,  # RowFormat.scale_offset: first scale byte of the row
    RELATIVE_BITS: tl.constexpr,  # triton_codec.relative_bits(row): 0 per-group ue5m3, B two-level
    HALF_PAD: tl.constexpr,
):
    """Dequantize rows to fp32 ``(even, odd)`` tiles ``[TILE_N, HALF_PAD]``; masked entries are +-0."""
    j = tl.arange(0, HALF_PAD)[None, :]
    mask = mask_n[:, None] & (j < HEAD_DIM // 2)
    packed = tl.load(row_ptrs[:, None] + j, mask=mask, other=0).to(tl.int32)
    scale = group_scale(row_ptrs, mask_n, j // (GROUP // 2), mask, ladder_ptr, SCALE_OFFSET, RELATIVE_BITS)
    even = tl.load(levels_ptr + (packed >> CODE_BITS)) * scale
    odd = tl.load(levels_ptr + (packed & CODE_MASK)) * scale
    return even, odd


@triton.jit
def fp32_to_bf16_bits(x):
    """bf16 bit pattern (int16) of finite fp32 ``x``, rounded to nearest even."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.to(tl.uint16).to(tl.int16, bitcast=True)
