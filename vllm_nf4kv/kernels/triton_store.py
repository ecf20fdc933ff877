"""Quantize-on-write (``store_kv_nf4``) and dequantizing gather (``load_kv_nf4``).

``store_kv_nf4`` is the whole store in one kernel: it reads the model-space K/V rows vLLM
hands the backend (any float dtype, strided views of the qkv output), applies the layer's
calibration (``(k - c) * d``, ``v - mu``), sanitizes, rotates
(:mod:`vllm_nf4kv.kernels.triton_rotation`) and encodes, and writes each token's cell at its
slot. Its bytes equal :func:`vllm_nf4kv.reference.write_paged` after the calibration's
``KVTransform`` (codes and scale codes), whatever the number of tokens in the call: every
program reads one row and computes a fixed expression of it. Exactness details pinned here:

* both sum a group's squared error in the same fixed order (see :func:`_pairwise_row_sum`);
* the division ``x / scale`` is IEEE round-to-nearest (``tl.math.div_rn``); Triton's
  plain fp32 ``/`` lowers to the approximate ``div.full.f32`` on NVIDIA;
* the kernel is launched with ``enable_fp_fusion=False`` so ``level * scale - x``,
  ``(k - c) * d`` and ``d * d + e`` are not contracted into FMAs (torch rounds each operation).

``prepared=True`` takes rows already sanitized and rotated (``reference.prepare_rows``): the
codec alone, which the codec tests feed rows a model never produces (NaN, inf, exact rungs).

``load_kv_nf4`` reads sequences through their block tables into rotated fp32 (or
fp16/bf16, rounded to nearest even) K/V; in fp32 it equals
:func:`vllm_nf4kv.reference.read_paged` exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_nf4kv.format import SCALE_MAX, CellLayout, RowFormat
from vllm_nf4kv.kernels.triton_codec import (
    CODE_BITS,
    NUM_LEVELS,
    NUM_MIDPOINTS,
    alignment,
    check_head_table,
    decode_scale,
    dequant_pairs,
    encode_scale_ceil,
    fp32_to_bf16_bits,
    ladder_table,
    next_power_of_2,
    nf4_tables,
    relative_bits,
    require_scheme,
)
from vllm_nf4kv.kernels.triton_rotation import rotate_rows, rotation_constexprs, rotation_table
from vllm_nf4kv.reference import check_paged_cache

_SANITIZE_MAX: tl.constexpr = tl.constexpr(SCALE_MAX)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OUT_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# Fixed launch heuristics (no autotune: its first-call benchmarking would stall the
# first forward pass). Store: one program per (token, KV head), one warp per 64
# elements of the head vector. With the rotation inside, the sm_90 build uses 255
# registers and ~100 B of stack a thread at head_dim 64-128 (compile_check
# --resources; 106-150 registers and no stack before): the reshape from the rotated
# row to the codec's tiles is what costs (a round trip through a global scratch row
# measured 113-145 registers, no stack, at the price of a buffer per call). Which one
# is faster is for a GPU to say (scripts/gpu_check.sh, store bandwidth). Load:
# 32-token tiles and 4 warps, a plain streaming copy (64-token tiles spilled at
# head_dim 128).
_STORE_ELEMENTS_PER_WARP = 64
_LOAD_TILE_N = 32
_LOAD_NUM_WARPS = 4


# ---------------------------------------------------------------- store


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


@triton.jit
def _prepared_row(
    src_ptr,  # first element of one model-space head vector, any float dtype
    stride_d,
    offset_ptr,  # [HEAD_DIM] fp32 calibration offset of this KV head (unread without HAS_OFFSET)
    scale_ptr,  # [HEAD_DIM] fp32 calibration key scale of this KV head (unread without HAS_SCALE)
    rotation_ptr,  # triton_rotation.rotation_table
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    STAGES: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    PREPARED: tl.constexpr,
):
    """``[D_PAD]`` fp32: ``KVTransform.keys`` / ``.values`` then ``reference.prepare_rows`` of one row.

    In fp32, one rounding per operation as torch does it: ``x - c``, then ``* d``, then the
    sanitize (NaN -> 0, +-inf -> +-SCALE_MAX) and the fp64 rotation. ``PREPARED`` rows are
    read as they are (already rotated).
    """
    cols = tl.arange(0, D_PAD)
    in_row = cols < HEAD_DIM
    x = tl.load(src_ptr + cols * stride_d, mask=in_row, other=0.0).to(tl.float32)
    if PREPARED:
        return x
    if HAS_OFFSET:
        x = x - tl.load(offset_ptr + cols, mask=in_row, other=0.0)
    if HAS_SCALE:
        x = x * tl.load(scale_ptr + cols, mask=in_row, other=0.0)
    x = _sanitize(x)
    return tl.reshape(rotate_rows(x[None, :], rotation_ptr, 1, D_PAD, STAGES, ONE_BLOCK), [D_PAD])


@triton.jit
def _store_kv_nf4_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim] fp32/fp16/bf16, model space (or prepared)
    value_ptr,  # [num_tokens, num_kv_heads, head_dim] fp32/fp16/bf16, model space (or prepared)
    cache_ptr,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8
    slot_mapping_ptr,  # [num_tokens] int32/int64; < 0: padding, skipped
    levels_ptr,  # [NUM_LEVELS] fp32
    midpoints_ptr,  # [NUM_MIDPOINTS] fp32
    k_ladder_ptr,  # fp32 relative ladder of the K rows (unread for per-group rows)
    v_ladder_ptr,  # fp32 relative ladder of the V rows (unread for per-group rows)
    rotation_ptr,  # triton_rotation.rotation_table (unread for PREPARED rows)
    key_offset_ptr,  # [num_kv_heads, head_dim] fp32 c (unread without HAS_KEY_OFFSET)
    key_scale_ptr,  # [num_kv_heads, head_dim] fp32 d (unread without HAS_KEY_SCALE)
    value_offset_ptr,  # [num_kv_heads, head_dim] fp32 mu (unread without HAS_VALUE_OFFSET)
    stride_k_tok: tl.int64,
    stride_k_head: tl.int64,
    stride_k_dim: tl.int64,
    stride_v_tok: tl.int64,
    stride_v_head: tl.int64,
    stride_v_dim: tl.int64,
    stride_c_block: tl.int64,
    stride_c_head: tl.int64,
    stride_c_tok: tl.int64,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    STAGES: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    HAS_KEY_OFFSET: tl.constexpr,
    HAS_KEY_SCALE: tl.constexpr,
    HAS_VALUE_OFFSET: tl.constexpr,
    PREPARED: tl.constexpr,
    VALUE_OFFSET: tl.constexpr,
    K_GROUP: tl.constexpr,
    K_SCALE_OFFSET: tl.constexpr,
    K_GROUPS_PAD: tl.constexpr,
    K_PAIRS_PAD: tl.constexpr,
    K_PAIR_LEVELS: tl.constexpr,
    K_SEARCH_STEPS: tl.constexpr,
    K_RELATIVE_BITS: tl.constexpr,
    K_RELATIVE_BYTES: tl.constexpr,
    K_RELATIVE_BYTES_PAD: tl.constexpr,
    V_GROUP: tl.constexpr,
    V_SCALE_OFFSET: tl.constexpr,
    V_GROUPS_PAD: tl.constexpr,
    V_PAIRS_PAD: tl.constexpr,
    V_PAIR_LEVELS: tl.constexpr,
    V_SEARCH_STEPS: tl.constexpr,
    V_RELATIVE_BITS: tl.constexpr,
    V_RELATIVE_BYTES: tl.constexpr,
    V_RELATIVE_BYTES_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    cell_ptr = cache_ptr + block * stride_c_block + head * stride_c_head + (slot % BLOCK_SIZE) * stride_c_tok
    key = _prepared_row(
        key_ptr + token * stride_k_tok + head * stride_k_head,
        stride_k_dim,
        key_offset_ptr + head * HEAD_DIM,
        key_scale_ptr + head * HEAD_DIM,
        rotation_ptr,
        HEAD_DIM,
        D_PAD,
        STAGES,
        ONE_BLOCK,
        HAS_KEY_OFFSET,
        HAS_KEY_SCALE,
        PREPARED,
    )
    _quantize_row(
        key,
        cell_ptr,
        levels_ptr,
        midpoints_ptr,
        k_ladder_ptr,
        HEAD_DIM,
        D_PAD,
        K_GROUP,
        K_SCALE_OFFSET,
        K_GROUPS_PAD,
        K_PAIRS_PAD,
        K_PAIR_LEVELS,
        K_SEARCH_STEPS,
        K_RELATIVE_BITS,
        K_RELATIVE_BYTES,
        K_RELATIVE_BYTES_PAD,
    )
    value = _prepared_row(
        value_ptr + token * stride_v_tok + head * stride_v_head,
        stride_v_dim,
        value_offset_ptr + head * HEAD_DIM,
        value_offset_ptr,
        rotation_ptr,
        HEAD_DIM,
        D_PAD,
        STAGES,
        ONE_BLOCK,
        HAS_VALUE_OFFSET,
        False,
        PREPARED,
    )
    _quantize_row(
        value,
        cell_ptr + VALUE_OFFSET,
        levels_ptr,
        midpoints_ptr,
        v_ladder_ptr,
        HEAD_DIM,
        D_PAD,
        V_GROUP,
        V_SCALE_OFFSET,
        V_GROUPS_PAD,
        V_PAIRS_PAD,
        V_PAIR_LEVELS,
        V_SEARCH_STEPS,
        V_RELATIVE_BITS,
        V_RELATIVE_BYTES,
        V_RELATIVE_BYTES_PAD,
    )


def _row_constexprs(fmt: RowFormat, prefix: str) -> dict[str, int]:
    """The store kernel's constexprs for one row, all from its RowFormat."""
    pairs_pad = next_power_of_2(fmt.group_size // 2)
    bits = relative_bits(fmt)
    relative_bytes = fmt.scale_bytes - 1 if bits else 0  # a TWO_LEVEL row's scale bytes after its row code
    return {
        f"{prefix}_GROUP": fmt.group_size,
        f"{prefix}_SCALE_OFFSET": fmt.scale_offset,
        f"{prefix}_GROUPS_PAD": next_power_of_2(fmt.num_groups),
        f"{prefix}_PAIRS_PAD": pairs_pad,
        f"{prefix}_PAIR_LEVELS": pairs_pad.bit_length() - 1,
        f"{prefix}_SEARCH_STEPS": fmt.search_steps,
        f"{prefix}_RELATIVE_BITS": bits,
        f"{prefix}_RELATIVE_BYTES": relative_bytes,
        f"{prefix}_RELATIVE_BYTES_PAD": next_power_of_2(max(1, relative_bytes)),
    }


def _check_rows(name: str, x: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 3 or x.shape[1] != num_kv_heads or x.shape[2] != head_dim:
        raise ValueError(
            f"{name} must be [num_tokens, {num_kv_heads}, {head_dim}] (the cache's KV heads and the "
            f"layout's head_dim), got {tuple(x.shape)}"
        )


def _check_device(kv_cache: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != kv_cache.device:
            raise ValueError(f"{name} is on {t.device} but kv_cache is on {kv_cache.device}")


def _check_cache(kv_cache: torch.Tensor, layout: CellLayout) -> None:
    check_paged_cache(kv_cache, layout)
    require_scheme(layout)
    if kv_cache.stride(-1) != 1:
        raise ValueError(
            f"kv_cache cells must be contiguous (stride 1 in the last dim), got {kv_cache.stride()}"
        )


def store_kv_nf4(
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim] fp32/fp16/bf16, model space
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim] fp32/fp16/bf16, model space
    slot_mapping: torch.Tensor,  # [num_slots <= num_tokens] int32/int64; < 0 skipped
    layout: CellLayout,
    *,
    key_offset: torch.Tensor | None = None,  # [num_kv_heads, head_dim] fp32: c (calibration)
    key_scale: torch.Tensor | None = None,  # [num_kv_heads, head_dim] fp32: d
    value_offset: torch.Tensor | None = None,  # [num_kv_heads, head_dim] fp32: mu
    prepared: bool = False,
) -> None:
    """Calibrate, sanitize, rotate and quantize K/V; write each token's cell at its slot.

    The cache then equals ``reference.write_paged`` of ``KVTransform.keys(key)`` and
    ``.values(value)`` (:mod:`vllm_nf4kv.calibration`), bit for bit; with ``prepared`` the rows
    are taken as already rotated and the bytes equal ``reference.quantize_rows``'. Slots are
    ``block * block_size + offset``; only the first ``len(slot_mapping)`` tokens are read (vLLM
    pads key/value). Launch shape and arguments depend on tensor shapes only: no host sync.
    """
    _check_cache(kv_cache, layout)
    num_kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    _check_rows("key", key, num_kv_heads, layout.head_dim)
    _check_rows("value", value, num_kv_heads, layout.head_dim)
    if slot_mapping.dtype not in (torch.int32, torch.int64) or slot_mapping.dim() != 1:
        raise TypeError(
            f"slot_mapping must be a 1-D int32/int64 tensor, got {slot_mapping.dtype} "
            f"{tuple(slot_mapping.shape)}"
        )
    num_tokens = slot_mapping.shape[0]
    if num_tokens > min(key.shape[0], value.shape[0]):
        raise ValueError(
            f"slot_mapping has {num_tokens} slots but key/value have {key.shape[0]}/{value.shape[0]} tokens"
        )
    _check_device(kv_cache, key=key, value=value, slot_mapping=slot_mapping)
    transform = {"key_offset": key_offset, "key_scale": key_scale, "value_offset": value_offset}
    for name, table in transform.items():
        check_head_table(name, table, num_kv_heads, layout.head_dim, kv_cache.device)
    if prepared and any(table is not None for table in transform.values()):
        raise ValueError(
            "prepared rows are already calibrated and rotated: pass no key_offset/key_scale/value_offset"
        )
    if num_tokens == 0:
        return
    levels, midpoints = nf4_tables(kv_cache.device)
    ladders = ladder_table(layout.key, kv_cache.device), ladder_table(layout.value, kv_cache.device)
    rotation = rotation_table(layout.head_dim, kv_cache.device)
    _store_kv_nf4_kernel[(num_tokens, num_kv_heads)](
        key,
        value,
        kv_cache,
        slot_mapping,
        levels,
        midpoints,
        *ladders,
        rotation,
        *(rotation if table is None else table for table in transform.values()),
        *key.stride(),
        *value.stride(),
        *kv_cache.stride()[:3],
        BLOCK_SIZE=block_size,
        HEAD_DIM=layout.head_dim,
        **rotation_constexprs(layout.head_dim),
        HAS_KEY_OFFSET=key_offset is not None,
        HAS_KEY_SCALE=key_scale is not None,
        HAS_VALUE_OFFSET=value_offset is not None,
        PREPARED=prepared,
        VALUE_OFFSET=layout.value_offset,
        **_row_constexprs(layout.key, "K"),
        **_row_constexprs(layout.value, "V"),
        num_warps=max(1, layout.head_dim // _STORE_ELEMENTS_PER_WARP),
        enable_fp_fusion=False,  # exactness: torch rounds every mul and add separately
    )


# ---------------------------------------------------------------- load


@triton.jit
def _store_pairs(out_ptrs, stride_d, even, odd, mask, HALF_PAD: tl.constexpr, OUT_KIND: tl.constexpr):
    """Write even/odd tiles to columns 2j / 2j+1 as fp32 (0), fp16 (1) or bf16 bits (2)."""
    j = tl.arange(0, HALF_PAD)[None, :]
    ptrs_even = out_ptrs[:, None] + (2 * j) * stride_d
    if OUT_KIND == 2:
        tl.store(ptrs_even, fp32_to_bf16_bits(even), mask=mask)
        tl.store(ptrs_even + stride_d, fp32_to_bf16_bits(odd), mask=mask)
    elif OUT_KIND == 1:
        tl.store(ptrs_even, even.to(tl.float16), mask=mask)
        tl.store(ptrs_even + stride_d, odd.to(tl.float16), mask=mask)
    else:
        tl.store(ptrs_even, even, mask=mask)
        tl.store(ptrs_even + stride_d, odd, mask=mask)


@triton.jit
def _load_kv_nf4_kernel(
    cache_ptr,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8
    block_table_ptr,  # [num_seqs, max_blocks_per_seq] int32/int64
    seq_lens_ptr,  # [num_seqs] int32/int64
    levels_ptr,  # [NUM_LEVELS] fp32
    k_ladder_ptr,  # fp32 relative ladder of the K rows (unread for per-group rows)
    v_ladder_ptr,  # fp32 relative ladder of the V rows (unread for per-group rows)
    key_out_ptr,  # [num_seqs, max_seq_len, num_kv_heads, head_dim] fp32/fp16 (bf16 as int16)
    value_out_ptr,  # [num_seqs, max_seq_len, num_kv_heads, head_dim] like key_out
    max_seq_len,
    stride_c_block: tl.int64,
    stride_c_head: tl.int64,
    stride_c_tok: tl.int64,
    stride_bt_seq: tl.int64,
    stride_o_seq: tl.int64,
    stride_o_tok: tl.int64,
    stride_o_head: tl.int64,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    VALUE_OFFSET: tl.constexpr,
    K_GROUP: tl.constexpr,
    K_SCALE_OFFSET: tl.constexpr,
    K_RELATIVE_BITS: tl.constexpr,
    V_GROUP: tl.constexpr,
    V_SCALE_OFFSET: tl.constexpr,
    V_RELATIVE_BITS: tl.constexpr,
    HALF_PAD: tl.constexpr,
    TILE_N: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    OUT_KIND: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1) * TILE_N + tl.arange(0, TILE_N)  # [TILE_N]
    head = tl.program_id(2).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    valid = pos < seq_len
    block = tl.load(block_table_ptr + seq * stride_bt_seq + pos // BLOCK_SIZE, mask=valid, other=0)
    offset = (pos % BLOCK_SIZE).to(tl.int64)
    cell = block.to(tl.int64) * stride_c_block + head * stride_c_head + offset * stride_c_tok
    cell = tl.multiple_of(cell, ROW_ALIGN)
    out = seq * stride_o_seq + pos.to(tl.int64) * stride_o_tok + head * stride_o_head  # [TILE_N]
    mask = (pos < max_seq_len)[:, None] & (tl.arange(0, HALF_PAD)[None, :] < HEAD_DIM // 2)
    row_ok = valid[:, None]  # rows past seq_len are written as zeros
    k_even, k_odd = dequant_pairs(
        cache_ptr + cell,
        valid,
        levels_ptr,
        k_ladder_ptr,
        HEAD_DIM,
        K_GROUP,
        K_SCALE_OFFSET,
        K_RELATIVE_BITS,
        HALF_PAD,
    )
    _store_pairs(
        key_out_ptr + out,
        1,
        tl.where(row_ok, k_even, 0.0),
        tl.where(row_ok, k_odd, 0.0),
        mask,
        HALF_PAD,
        OUT_KIND,
    )
    v_even, v_odd = dequant_pairs(
        cache_ptr + VALUE_OFFSET + cell,
        valid,
        levels_ptr,
        v_ladder_ptr,
        HEAD_DIM,
        V_GROUP,
        V_SCALE_OFFSET,
        V_RELATIVE_BITS,
        HALF_PAD,
    )
    _store_pairs(
        value_out_ptr + out,
        1,
        tl.where(row_ok, v_even, 0.0),
        tl.where(row_ok, v_odd, 0.0),
        mask,
        HALF_PAD,
        OUT_KIND,
    )


def load_kv_nf4(
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32/int64
    seq_lens: torch.Tensor,  # [num_seqs] int32/int64
    layout: CellLayout,
    *,
    max_seq_len: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize sequences to rotated K, V ``[num_seqs, max_seq_len, num_kv_heads, head_dim]``.

    Row ``t`` of sequence ``i`` equals ``reference.read_paged(kv_cache, block_table[i],
    seq_lens[i], layout)[.][t]`` (exactly in fp32; fp16/bf16 round to nearest even);
    rows at or past ``seq_lens[i]`` are zero. ``max_seq_len`` defaults to
    ``seq_lens.max()`` (a host sync); pass it when known.
    """
    _check_cache(kv_cache, layout)
    if out_dtype not in _OUT_KINDS:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if block_table.dtype not in (torch.int32, torch.int64) or block_table.dim() != 2:
        raise TypeError(
            f"block_table must be 2-D int32/int64 [num_seqs, max_blocks_per_seq], got "
            f"{block_table.dtype} {tuple(block_table.shape)}"
        )
    if seq_lens.dtype not in (torch.int32, torch.int64) or seq_lens.shape != block_table.shape[:1]:
        raise TypeError(
            f"seq_lens must be int32/int64 [{block_table.shape[0]}] (one per block_table row), "
            f"got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )
    if block_table.stride(-1) != 1:
        raise ValueError("block_table rows must be contiguous")
    _check_device(kv_cache, block_table=block_table, seq_lens=seq_lens)
    num_seqs = block_table.shape[0]
    num_kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if num_seqs else 0
    if max_seq_len > block_table.shape[1] * block_size:
        raise ValueError(
            f"max_seq_len={max_seq_len} exceeds the block table's capacity "
            f"{block_table.shape[1]} x {block_size}"
        )
    shape = (num_seqs, max_seq_len, num_kv_heads, layout.head_dim)
    key = torch.empty(shape, dtype=out_dtype, device=kv_cache.device)
    value = torch.empty(shape, dtype=out_dtype, device=kv_cache.device)
    if key.numel() == 0:
        return key, value
    key_out, value_out = (
        (key.view(torch.int16), value.view(torch.int16)) if out_dtype == torch.bfloat16 else (key, value)
    )
    levels, _ = nf4_tables(kv_cache.device)
    ladders = ladder_table(layout.key, kv_cache.device), ladder_table(layout.value, kv_cache.device)
    grid = (num_seqs, triton.cdiv(max_seq_len, _LOAD_TILE_N), num_kv_heads)
    _load_kv_nf4_kernel[grid](
        kv_cache,
        block_table,
        seq_lens,
        levels,
        *ladders,
        key_out,
        value_out,
        max_seq_len,
        *kv_cache.stride()[:3],
        block_table.stride(0),
        *key.stride()[:3],
        BLOCK_SIZE=block_size,
        HEAD_DIM=layout.head_dim,
        VALUE_OFFSET=layout.value_offset,
        K_GROUP=layout.key.group_size,
        K_SCALE_OFFSET=layout.key.scale_offset,
        K_RELATIVE_BITS=relative_bits(layout.key),
        V_GROUP=layout.value.group_size,
        V_SCALE_OFFSET=layout.value.scale_offset,
        V_RELATIVE_BITS=relative_bits(layout.value),
        HALF_PAD=next_power_of_2(layout.head_dim // 2),
        TILE_N=_LOAD_TILE_N,
        ROW_ALIGN=alignment(*kv_cache.stride()[:3]),
        OUT_KIND=_OUT_KINDS[out_dtype],
        num_warps=_LOAD_NUM_WARPS,
        enable_fp_fusion=False,  # level * scale must round like torch
    )
    return key, value
