"""Quantize-on-write: ``store_kv_nf4``, the whole store in one kernel.

It reads the model-space K/V rows vLLM hands the backend (any float dtype, strided views of
the qkv output), applies the layer's calibration (``(k - c) * d``, ``v - mu``), sanitizes,
rotates (:mod:`vllm_nf4kv.kernels.triton_rotation`) and encodes
(:mod:`vllm_nf4kv.kernels.triton_quantize`), and writes each token's cell at its slot. Its
bytes equal :func:`vllm_nf4kv.reference.write_paged` after the calibration's ``KVTransform``
(codes and scale codes), whatever the number of tokens in the call: every program reads one
row and computes a fixed expression of it. The encoder's exactness details are in
:mod:`~vllm_nf4kv.kernels.triton_quantize`; here, the kernel is launched with
``enable_fp_fusion=False`` so ``(k - c) * d`` and the encoder's products are not contracted
into FMAs (torch rounds each operation).

``prepared=True`` takes rows already sanitized and rotated (``reference.prepare_rows``): the
codec alone, which the codec tests feed rows a model never produces (NaN, inf, exact rungs).

Reading the cache back is attention's job (:mod:`vllm_nf4kv.kernels.triton_attention`); the
tests' dequantizing gather, ``load_kv_nf4``, lives in ``tests/triton_load.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_nf4kv.format import CellLayout, RowFormat
from vllm_nf4kv.kernels.triton_codec import (
    check_head_table,
    ladder_table,
    next_power_of_2,
    nf4_tables,
    relative_bits,
    require_scheme,
)
from vllm_nf4kv.kernels.triton_quantize import _quantize_row, _sanitize
from vllm_nf4kv.kernels.triton_rotation import rotate_rows, rotation_constexprs, rotation_table
from vllm_nf4kv.reference import check_paged_cache

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Fixed launch heuristics (no autotune: its first-call benchmarking would stall the
# first forward pass): one program per (token, KV head), one warp per 64 elements of
# the head vector. With the rotation inside, the sm_90 build uses 255 registers and
# ~100 B of stack a thread at head_dim 64-128 (tests/compile_check.py --resources;
# 106-150 registers and no stack before): the reshape from the rotated row to the
# codec's tiles is what costs (a round trip through a global scratch row measured
# 113-145 registers, no stack, at the price of a buffer per call). Which one is faster
# is for a GPU to say (scripts/gpu_check.sh, store bandwidth).
_STORE_ELEMENTS_PER_WARP = 64


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
