"""The store's row encoder: one rotated head vector to NF4 codes and scale codes, in registers.

These ``@triton.jit`` helpers are the quantizing half of the codec (the decoding half, shared
with attention, is :mod:`vllm_nf4kv.kernels.triton_codec`), apart from the store kernel
(:mod:`vllm_nf4kv.kernels.triton_store`: read, calibrate, rotate, launch) because they are
its own job and its longest part. :func:`_quantize_row` is ``reference.quantize_groups``
(per-group ue5m3) or ``reference.quantize_two_level``, operation for operation, so the bytes
are bit-identical:

* both sum a group's squared error in the same fixed order (see :func:`_pairwise_row_sum`);
* the division ``x / scale`` is IEEE round-to-nearest (``tl.math.div_rn``); Triton's
  plain fp32 ``/`` lowers to the approximate ``div.full.f32`` on NVIDIA;
* ``level * scale - x`` and ``d * d + e`` must not be contracted into FMAs: the kernel that
  calls these is launched with ``enable_fp_fusion=False``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vllm_nf4kv.format import SCALE_MAX
from vllm_nf4kv.kernels.triton_codec import (
    CODE_BITS,
    NUM_LEVELS,
    NUM_MIDPOINTS,
    decode_scale,
    encode_scale_ceil,
)

_SANITIZE_MAX: tl.constexpr = tl.constexpr(SCALE_MAX)


@triton.jit
def _sanitize(x):
    """``reference.sanitize``: NaN -> 0, +-inf -> +-SCALE_MAX (after the caller's rotation)."""
    x = tl.where(x != x, 0.0, x)
    x = tl.where(x == float("inf"), _SANITIZE_MAX, x)
    return tl.where(x == float("-inf"), -_SANITIZE_MAX, x)


@triton.jit
def _nf4_encode(v, midpoints):
    """Nearest NF4 index of ``v [R, C]`` in [-1, 1]: how many of the ``midpoints [NUM_LEVELS]``
    (NUM_MIDPOINTS fp32 thresholds, then +inf) lie below it."""
    return tl.sum((v[:, :, None] > midpoints[None, None, :]).to(tl.int32), axis=2)


@triton.jit
def _pairwise_row_sum(t, ROWS: tl.constexpr, LEVELS: tl.constexpr):
    """Sum ``t [ROWS, 2**LEVELS]`` along rows by adding neighbours (0,1), (2,3), ...
    level by level: a fixed order the reference can reproduce exactly."""
    for _ in tl.static_range(LEVELS):
        a, b = tl.split(tl.reshape(t, [ROWS, t.shape[1] // 2, 2]))
        t = a + b
    return tl.reshape(t, [ROWS])


@triton.jit
def _group_codes(
    x_even, x_odd, scale, levels_ptr, midpoints, GROUPS_PAD: tl.constexpr, PAIR_LEVELS: tl.constexpr
):
    """NF4 codes of a row tile under one scale per group, and each group's squared error."""
    safe = tl.where(scale > 0, scale, 1.0)
    c_even = _nf4_encode(tl.minimum(tl.maximum(tl.math.div_rn(x_even, safe), -1.0), 1.0), midpoints)
    c_odd = _nf4_encode(tl.minimum(tl.maximum(tl.math.div_rn(x_odd, safe), -1.0), 1.0), midpoints)
    d_even = tl.load(levels_ptr + c_even) * scale - x_even
    d_odd = tl.load(levels_ptr + c_odd) * scale - x_odd
    # level 1 of the pairwise sum: elements 2j and 2j + 1 of the group
    err = _pairwise_row_sum(d_even * d_even + d_odd * d_odd, GROUPS_PAD, PAIR_LEVELS)
    return c_even, c_odd, err


@triton.jit
def _candidate_scale(code, row_scale, ladder_ptr, RELATIVE_BITS: tl.constexpr):
    """fp32 scale of candidate codes ``[GROUPS_PAD]``: a ue5m3 code's value, or ``row_scale * ladder[k]``."""
    if RELATIVE_BITS == 0:
        scale = decode_scale(code)
    else:
        scale = row_scale * tl.load(ladder_ptr + code)
    return scale


@triton.jit
def _store_relative_codes(
    ptr,  # first byte after the row code, uint8
    codes,  # [GROUPS_PAD] int32 relative codes, each < 2**RELATIVE_BITS
    NUM_GROUPS: tl.constexpr,
    GROUPS_PAD: tl.constexpr,
    RELATIVE_BITS: tl.constexpr,
    RELATIVE_BYTES: tl.constexpr,  # RowFormat.scale_bytes minus the row code
    RELATIVE_BYTES_PAD: tl.constexpr,
):
    """``reference.pack_bits``: code ``j`` at bits ``B*j .. B*j + B - 1`` of the bytes, LSB first.

    Byte ``b`` gathers the part of every code whose bit range meets its bits ``8b .. 8b + 7``
    (shifted left or right into place); the parts never overlap, so a sum is their OR. Shift
    amounts are clamped to where they matter, so no lane shifts by the bit width or more.
    """
    b = tl.arange(0, RELATIVE_BYTES_PAD)
    shift = tl.arange(0, GROUPS_PAD)[None, :] * RELATIVE_BITS - b[:, None] * 8  # code bit 0 in byte b
    meets = (tl.arange(0, GROUPS_PAD) < NUM_GROUPS)[None, :] & (shift < 8) & (shift > -RELATIVE_BITS)
    code = codes[None, :]
    part = tl.where(
        shift >= 0,
        code << tl.minimum(tl.maximum(shift, 0), 8),
        code >> tl.minimum(tl.maximum(-shift, 0), RELATIVE_BITS),
    )
    byte = tl.sum(tl.where(meets, part & 0xFF, 0), axis=1)
    tl.store(ptr + b, byte.to(tl.uint8), mask=b < RELATIVE_BYTES)


@triton.jit
def _row_tiles(
    row,  # [D_PAD] fp32, one head vector (0 past HEAD_DIM)
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS_PAD: tl.constexpr,
    PAIRS_PAD: tl.constexpr,
):
    """The row as the codec's ``(even, odd)`` tiles ``[GROUPS_PAD, PAIRS_PAD]``: entry ``(g, j)``
    holds elements ``g * GROUP + 2j`` and ``+ 1``; padding entries 0.

    Power-of-two groups tile the padded row exactly (a reshape); other group sizes (head
    sizes such as 96, or 8 groups of 12) gather their entries.
    """
    if GROUPS_PAD * GROUP == D_PAD and 2 * PAIRS_PAD == GROUP:
        even, odd = tl.split(tl.reshape(row, [GROUPS_PAD, PAIRS_PAD, 2]))
    else:
        g = tl.arange(0, GROUPS_PAD)[:, None]
        j = tl.arange(0, PAIRS_PAD)[None, :]
        mask = (g < HEAD_DIM // GROUP) & (j < GROUP // 2)
        index = tl.reshape(tl.where(mask, g * GROUP + 2 * j, 0), [GROUPS_PAD * PAIRS_PAD])
        even = tl.where(mask, tl.reshape(tl.gather(row, index, 0), [GROUPS_PAD, PAIRS_PAD]), 0.0)
        odd = tl.where(mask, tl.reshape(tl.gather(row, index + 1, 0), [GROUPS_PAD, PAIRS_PAD]), 0.0)
    return even, odd


@triton.jit
def _quantize_row(
    row,  # [D_PAD] fp32, one rotated head vector (0 past HEAD_DIM), not yet sanitized
    row_ptr,  # first byte of its stored row (codes then scale codes), uint8
    levels_ptr,  # [NUM_LEVELS] fp32
    midpoints_ptr,  # [NUM_MIDPOINTS] fp32
    ladder_ptr,  # [2**RELATIVE_BITS] fp32 relative ladder (unread when RELATIVE_BITS == 0)
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    SCALE_OFFSET: tl.constexpr,
    GROUPS_PAD: tl.constexpr,
    PAIRS_PAD: tl.constexpr,
    PAIR_LEVELS: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    RELATIVE_BITS: tl.constexpr,  # triton_codec.relative_bits(row): 0 per-group ue5m3, B two-level
    RELATIVE_BYTES: tl.constexpr,
    RELATIVE_BYTES_PAD: tl.constexpr,
):
    """One row, ``reference.quantize_groups`` (per-group ue5m3) or ``reference.quantize_two_level``.

    Both search ``SEARCH_STEPS`` candidates from a first one, keeping the least squared error
    (the first on ties). Per-group: the ceil ue5m3 code of the group's absmax and the codes
    below it. Two-level: the ceil ue5m3 code of the row's absmax is stored once; a group's
    candidates are ladder rungs ``k = min(first + s, 2**B - 1)`` from the last rung whose
    ``row_scale * ladder[k]`` still covers the group's absmax (rung 0 if none does).
    """
    # tile [GROUPS_PAD, PAIRS_PAD]: entry (g, j) is the pair (2j, 2j + 1) of group g
    g = tl.arange(0, GROUPS_PAD)[:, None]
    j = tl.arange(0, PAIRS_PAD)[None, :]
    mask = (g < HEAD_DIM // GROUP) & (j < GROUP // 2)
    x_even, x_odd = _row_tiles(row, HEAD_DIM, D_PAD, GROUP, GROUPS_PAD, PAIRS_PAD)
    x_even, x_odd = _sanitize(x_even), _sanitize(x_odd)  # an fp64 rotation can round to +-inf

    # the thresholds padded with +inf to NUM_LEVELS, a power of two
    lanes = tl.arange(0, NUM_LEVELS)
    midpoints = tl.load(midpoints_ptr + lanes, mask=lanes < NUM_MIDPOINTS, other=float("inf"))
    absmax = tl.max(tl.maximum(tl.abs(x_even), tl.abs(x_odd)), axis=1)  # [GROUPS_PAD], padding 0
    if RELATIVE_BITS == 0:
        row_scale = 0.0  # no row level
        first = encode_scale_ceil(absmax)
    else:
        row_code = encode_scale_ceil(tl.max(absmax, axis=0))
        row_scale = decode_scale(row_code)
        rungs = row_scale * tl.load(ladder_ptr + tl.arange(0, 1 << RELATIVE_BITS))  # descending
        covering = tl.sum((rungs[None, :] >= absmax[:, None]).to(tl.int32), axis=1)
        first = tl.maximum(covering - 1, 0)
    best_code = first
    best_even, best_odd, best_err = _group_codes(
        x_even,
        x_odd,
        _candidate_scale(first, row_scale, ladder_ptr, RELATIVE_BITS)[:, None],
        levels_ptr,
        midpoints,
        GROUPS_PAD,
        PAIR_LEVELS,
    )
    for step in tl.static_range(1, SEARCH_STEPS):
        if RELATIVE_BITS == 0:
            code = tl.where(first > step, first - step, first)  # below code 1: the ceil code again
        else:
            code = tl.minimum(first + step, (1 << RELATIVE_BITS) - 1)  # past the last rung: the last
        c_even, c_odd, err = _group_codes(
            x_even,
            x_odd,
            _candidate_scale(code, row_scale, ladder_ptr, RELATIVE_BITS)[:, None],
            levels_ptr,
            midpoints,
            GROUPS_PAD,
            PAIR_LEVELS,
        )
        better = err < best_err  # strict: the first (largest) scale wins ties
        best_code = tl.where(better, code, best_code)
        best_even = tl.where(better[:, None], c_even, best_even)
        best_odd = tl.where(better[:, None], c_odd, best_odd)
        best_err = tl.where(better, err, best_err)

    packed = (best_even << CODE_BITS) | best_odd  # even index in the high nibble
    tl.store(row_ptr + g * (GROUP // 2) + j, packed.to(tl.uint8), mask=mask)
    if RELATIVE_BITS == 0:
        groups = tl.arange(0, GROUPS_PAD)
        tl.store(row_ptr + SCALE_OFFSET + groups, best_code.to(tl.uint8), mask=groups < HEAD_DIM // GROUP)
    else:
        tl.store(row_ptr + SCALE_OFFSET, row_code.to(tl.uint8))
        _store_relative_codes(
            row_ptr + SCALE_OFFSET + 1,
            best_code,
            HEAD_DIM // GROUP,
            GROUPS_PAD,
            RELATIVE_BITS,
            RELATIVE_BYTES,
            RELATIVE_BYTES_PAD,
        )
