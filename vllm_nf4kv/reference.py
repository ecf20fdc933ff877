"""Pure-torch NF4 codec: the ground truth for every kernel and backend.

Each step is written so a kernel can reproduce it bit for bit: scale codes are
found with integer operations on the fp32 bit pattern (no ``log2``), NF4 codes
by counting how many of the 15 fp32 midpoints a value exceeds, and values are
decoded as ``level * scale`` in fp32. Kernels are tested for equality of codes
and scale codes against this module; this module is tested against the math.

Non-finite input has a defined result: NaN is stored as 0, +-inf as the largest
representable magnitude. Nothing crashes and nothing poisons neighbouring
groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_nf4kv.format import (
    CODE_BITS,
    CODE_MASK,
    DEFAULT_SEARCH_STEPS,
    FP32_EXP_BIAS,
    FP32_MANTISSA_BITS,
    NF4_LEVELS,
    SCALE_CODE_MAX,
    SCALE_CODE_MIN,
    SCALE_DROPPED_BITS,
    SCALE_EXP_BIAS,
    SCALE_MANTISSA_BITS,
    SCALE_MANTISSA_MASK,
    SCALE_MAX,
    CellLayout,
    RowFormat,
    ScaleScheme,
)
from vllm_nf4kv.format import relative_ladder as fmt_relative_ladder
from vllm_nf4kv.rotation import rotate, unrotate


def nf4_levels(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 levels as fp32."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def nf4_midpoints(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 15 decision thresholds, computed in fp32 (kernels load this tensor)."""
    levels = nf4_levels(device)
    return (levels[:-1] + levels[1:]) / 2


# ---------------------------------------------------------------- scale codes


def encode_scale_ceil(scale: torch.Tensor) -> torch.Tensor:
    """Smallest ue5m3 code whose value is >= ``scale`` (int32, 0 for scale == 0).

    Integer-only on the fp32 bits: exponent = bits >> 23, the 3-bit mantissa is
    the top 3 mantissa bits rounded *up*. Out-of-range scales clamp to the
    smallest / largest code.
    """
    scale = scale.float().clamp(0.0, SCALE_MAX)
    bits = scale.contiguous().view(torch.int32)
    exponent = (bits >> FP32_MANTISSA_BITS) - FP32_EXP_BIAS + SCALE_EXP_BIAS
    round_up = (1 << SCALE_DROPPED_BITS) - 1  # ceil on the dropped mantissa bits
    mantissa = ((bits & ((1 << FP32_MANTISSA_BITS) - 1)) + round_up) >> SCALE_DROPPED_BITS
    code = (exponent << SCALE_MANTISSA_BITS) + mantissa  # a mantissa carry bumps the exponent
    code = code.clamp(SCALE_CODE_MIN, SCALE_CODE_MAX)
    return torch.where(scale > 0, code, torch.zeros_like(code))


def decode_scale(code: torch.Tensor) -> torch.Tensor:
    """fp32 value of ue5m3 codes, built from bits (exact; code 0 is 0.0)."""
    code = code.to(torch.int32)
    exponent = (code >> SCALE_MANTISSA_BITS) - SCALE_EXP_BIAS + FP32_EXP_BIAS
    bits = (exponent << FP32_MANTISSA_BITS) | ((code & SCALE_MANTISSA_MASK) << SCALE_DROPPED_BITS)
    value = bits.view(torch.float32)
    return torch.where(code > 0, value, torch.zeros_like(value))


# ---------------------------------------------------------------- NF4 codes


def nf4_encode(normalized: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 level index (uint8) of values in [-1, 1]: count midpoints below."""
    midpoints = nf4_midpoints(normalized.device)
    # bucketize(right=False) returns the number of midpoints strictly below each value.
    return torch.bucketize(normalized.contiguous(), midpoints).to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[..., 2n]`` codes 0..15 -> ``[..., n]`` bytes, even index in the high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"need an even number of codes, got {codes.shape[-1]}")
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] << CODE_BITS) | codes[..., 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`."""
    high, low = packed >> CODE_BITS, packed & CODE_MASK
    return torch.stack([high, low], dim=-1).flatten(-2)


def sanitize(x: torch.Tensor) -> torch.Tensor:
    """fp32 copy with NaN -> 0 and +-inf -> +-SCALE_MAX.

    Applied twice on every store path (docs/format.md, "Who sanitizes and rotates"): by
    :func:`prepare_rows` before the rotation, so a NaN cannot spread over a whole vector,
    and by :func:`quantize_groups` after it, since an fp64 rotation of huge finite values
    can round to +-inf in fp32.
    """
    return torch.nan_to_num(x.float(), nan=0.0, posinf=SCALE_MAX, neginf=-SCALE_MAX)


def prepare_rows(x: torch.Tensor) -> torch.Tensor:
    """Model-space head vectors ``[..., D]`` -> the fp32 rotated vectors the codec quantizes.

    The one definition of the store's first step (sanitize, then rotate); the C++ and Triton
    store kernels do the same operations inside (``csrc/rotation.h``, ``kernels/triton_rotation``).
    """
    return rotate(sanitize(x))


def pairwise_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in a fixed pairwise order: (0+1), (2+3), ... level by level.

    Why: ``torch.sum``'s order is unspecified (it differs between CPU ISAs and
    CUDA), and the scale search compares sums; with a fixed order the Triton
    store kernel picks the same scale code by construction.
    """
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = torch.nn.functional.pad(x, (0, 1))
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def quantize_groups(
    x: torch.Tensor, group_size: int, search_steps: int = DEFAULT_SEARCH_STEPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``[..., D]`` (already rotated) to codes ``[..., D]`` and ue5m3 scale codes ``[..., D/g]``.

    Scale choice: start from the smallest code that covers the group's absmax
    (no clipping), then try ``search_steps - 1`` codes below it and keep the one
    with the least squared error (the first, i.e. largest, on ties). Smaller
    scales clip the extreme value but give the bulk finer levels; for Gaussian
    groups that trade wins most of the time.
    """
    groups = _groups(x, group_size, search_steps)  # [..., G, g]
    first = encode_scale_ceil(groups.abs().amax(-1))  # [..., G]
    # All candidates at once: the ceil code and the search_steps - 1 codes below it
    # (a candidate that would go below code 1 repeats the ceil code).
    steps = torch.arange(search_steps, device=x.device)
    candidates = torch.where(first.unsqueeze(-1) > steps, first.unsqueeze(-1) - steps, first.unsqueeze(-1))
    codes, best = best_of_scales(groups, decode_scale(candidates))
    return codes, candidates.gather(-1, best).squeeze(-1).to(torch.uint8)


def quantize_two_level(
    x: torch.Tensor, group_size: int, relative_bits: int, search_steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ScaleScheme.TWO_LEVEL``: codes ``[..., D]``, row codes ``[...]``, group codes ``[..., D/g]``.

    The row code is the smallest ue5m3 code covering the row's absmax; a group's candidate
    scales are ``row_scale * ladder[k]`` (fp32), descending in ``k``. The search starts at
    the largest ``k`` whose scale still covers the group's absmax (0 when even the row scale
    does not, i.e. the row was clamped to SCALE_MAX) and tries the ``search_steps - 1``
    smaller scales after it (clamped to the last rung), keeping the least squared error, the
    larger scale on ties, as :func:`quantize_groups` does.
    """
    groups = _groups(x, group_size, search_steps)
    absmax = groups.abs().amax(-1)  # [..., G]
    row_code = encode_scale_ceil(absmax.amax(-1))  # [...]
    ladder = decode_scale(row_code).unsqueeze(-1).unsqueeze(-1) * relative_ladder(relative_bits, x.device)
    covering = (ladder >= absmax.unsqueeze(-1)).sum(-1)  # [..., G]: rungs 0 .. covering - 1 cover
    first = (covering - 1).clamp_min(0)
    steps = torch.arange(search_steps, device=x.device)
    candidates = (first.unsqueeze(-1) + steps).clamp_max(2**relative_bits - 1)  # [..., G, S]
    scales = ladder.expand(*absmax.shape, -1).gather(-1, candidates)
    codes, best = best_of_scales(groups, scales)
    return codes, row_code.to(torch.uint8), candidates.gather(-1, best).squeeze(-1).to(torch.uint8)


def _groups(x: torch.Tensor, group_size: int, search_steps: int) -> torch.Tensor:
    if x.shape[-1] % group_size:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of group_size {group_size}")
    if search_steps < 1:
        raise ValueError(f"search_steps must be >= 1, got {search_steps}")
    return sanitize(x).unflatten(-1, (-1, group_size))  # [..., G, g]


def best_of_scales(groups: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[..., D]`` under the best of candidate scales ``[..., G, S]``, and its index ``[..., G, 1]``.

    ``groups``: sanitized values ``[..., G, g]``. Best: the least pairwise-summed squared
    error, the first candidate on ties. The one scale search of every NF4 row: the stored
    schemes above, and the ablation's other scale codes (``tools/kv_formats.py``).
    """
    group_size = groups.shape[-1]
    scale = scale.unsqueeze(-1)  # [..., G, S, 1]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = nf4_encode((groups.unsqueeze(-2) / safe).clamp(-1.0, 1.0))  # [..., G, S, g]
    err = pairwise_sum((nf4_levels(groups.device)[codes.long()] * scale - groups.unsqueeze(-2)) ** 2)
    best = err.argmin(-1, keepdim=True)  # the first minimum: the largest scale on ties
    best_codes = codes.gather(-2, best.unsqueeze(-1).expand(*best.shape, group_size)).squeeze(-2)
    return best_codes.flatten(-2), best


def dequantize_groups(codes: torch.Tensor, scale_codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes ``[..., D]`` and scale codes ``[..., D/g]`` back to fp32 ``[..., D]``."""
    levels = nf4_levels(codes.device)[codes.long()].unflatten(-1, (-1, group_size))
    return (levels * decode_scale(scale_codes).unsqueeze(-1)).flatten(-2)


_LADDERS: dict[tuple[int, str], torch.Tensor] = {}


def relative_ladder(bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``format.relative_ladder(bits)`` as an fp32 tensor (the table the kernels are handed)."""
    key = (bits, str(device))
    if key not in _LADDERS:
        _LADDERS[key] = torch.tensor(fmt_relative_ladder(bits), dtype=torch.float32, device=device)
    return _LADDERS[key]


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., n]`` codes of ``bits`` bits -> ``[..., ceil(n * bits / 8)]`` bytes, LSB first.

    Code ``j`` holds bits ``bits * j .. bits * j + bits - 1`` of the little-endian bytes.
    """
    n = codes.shape[-1]
    bit_index = torch.arange(n * bits, device=codes.device)
    values = (codes.long().repeat_interleave(bits, -1) >> (bit_index % bits)) & 1  # [..., n * bits]
    values = F.pad(values, (0, -(-n * bits // 8) * 8 - n * bits)).unflatten(-1, (-1, 8))
    weights = 2 ** torch.arange(8, device=codes.device)
    return (values * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes (int64)."""
    stream = (packed.long().unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1  # [..., bytes, 8]
    stream = stream.flatten(-2)[..., : n * bits].unflatten(-1, (n, bits))
    return (stream << torch.arange(bits, device=packed.device)).sum(-1)


# ---------------------------------------------------------------- head rows


def _check_rows(x: torch.Tensor, fmt: RowFormat, name: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (fp32/fp16/bf16), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != fmt.head_dim:
        raise ValueError(f"{name} must end in head_dim={fmt.head_dim}, got shape {tuple(x.shape)}")


def quantize_rows(x: torch.Tensor, fmt: RowFormat) -> torch.Tensor:
    """Quantize already *rotated* head vectors ``[..., D]`` into stored rows ``[..., row_bytes]``."""
    _check_rows(x, fmt, "x")
    if fmt.scale_scheme is ScaleScheme.TWO_LEVEL:
        codes, row_code, relative = quantize_two_level(x, fmt.group_size, fmt.relative_bits, fmt.search_steps)
        scale_bytes = torch.cat([row_code.unsqueeze(-1), pack_bits(relative, fmt.relative_bits)], dim=-1)
    else:
        codes, scale_bytes = quantize_groups(x, fmt.group_size, fmt.search_steps)
    return torch.cat([pack_nibbles(codes), scale_bytes], dim=-1)


def group_scales(rows: torch.Tensor, fmt: RowFormat) -> torch.Tensor:
    """fp32 scale of every group of stored rows ``[..., row_bytes]`` -> ``[..., num_groups]``."""
    scale_bytes = rows[..., fmt.scale_offset : fmt.scale_offset + fmt.scale_bytes]
    if fmt.scale_scheme is ScaleScheme.TWO_LEVEL:
        relative = unpack_bits(scale_bytes[..., 1:], fmt.num_groups, fmt.relative_bits)
        ladder = relative_ladder(fmt.relative_bits, rows.device)
        return decode_scale(scale_bytes[..., 0]).unsqueeze(-1) * ladder[relative]
    return _decode_tables(rows.device)[1][scale_bytes.long()].squeeze(-1)


def encode_rows(x: torch.Tensor, fmt: RowFormat) -> torch.Tensor:
    """Sanitize, rotate and quantize model-space head vectors ``[..., D]`` into stored rows."""
    _check_rows(x, fmt, "x")
    return quantize_rows(prepare_rows(x), fmt)


def decode_rows_rotated(rows: torch.Tensor, fmt: RowFormat) -> torch.Tensor:
    """Stored rows ``[..., row_bytes]`` to fp32 vectors in the *rotated* space."""
    if rows.dtype != torch.uint8 or rows.shape[-1] != fmt.row_bytes:
        raise ValueError(f"rows must be uint8 [..., {fmt.row_bytes}], got {rows.dtype} {tuple(rows.shape)}")
    byte_levels = _decode_tables(rows.device)[0]
    # One table lookup per byte (two levels): the same fp32 level * scale products as
    # dequantize_groups, about 3x faster on CPU than unpacking nibbles.
    codes = rows[..., fmt.code_offset : fmt.code_offset + fmt.code_bytes]
    levels = F.embedding(codes.long(), byte_levels)  # [..., D/2, 2]
    levels = levels.flatten(-2).unflatten(-1, (-1, fmt.group_size))  # [..., G, g]
    return (levels * group_scales(rows, fmt).unsqueeze(-1)).flatten(-2)


_DECODE_TABLES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _decode_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[256, 2]`` levels of a byte's (high, low) nibbles and ``[256, 1]`` scale values."""
    tables = _DECODE_TABLES.get(str(device))
    if tables is None:
        codes = unpack_nibbles(torch.arange(256, dtype=torch.uint8, device=device))
        byte_levels = nf4_levels(device)[codes.long()].view(256, 2)
        scale_values = decode_scale(torch.arange(SCALE_CODE_MAX + 1, device=device)).view(-1, 1)
        tables = _DECODE_TABLES[str(device)] = (byte_levels, scale_values)
    return tables


def fake_quantize_rows(x: torch.Tensor, fmt: RowFormat) -> torch.Tensor:
    """Round trip in the original space, in ``x``'s dtype (for ablations and reports)."""
    return unrotate(decode_rows_rotated(encode_rows(x, fmt), fmt)).to(x.dtype)


# ---------------------------------------------------------------- paged cache


def write_paged(
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int, slot = block * block_size + offset; < 0 skipped
    layout: CellLayout,
) -> None:
    """Quantize K/V and store each token's cells at its slot (the reference of the store kernels)."""
    check_paged_cache(kv_cache, layout)
    if key.shape != value.shape or key.dim() != 3 or key.shape[1] != kv_cache.shape[1]:
        raise ValueError(
            f"key/value must be [num_tokens, {kv_cache.shape[1]}, {layout.head_dim}], "
            f"got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    num_tokens = slot_mapping.shape[0]
    key, value = key[:num_tokens], value[:num_tokens]
    valid = slot_mapping >= 0
    if not bool(valid.any()):
        return
    slots = slot_mapping[valid].long()
    key_rows = encode_rows(key[valid], layout.key)
    value_rows = encode_rows(value[valid], layout.value)
    cells = torch.cat([key_rows, value_rows], dim=-1)  # [n, H, cell]
    block_size = kv_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, :, offsets, :] = cells


def read_paged(
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8
    block_table: torch.Tensor,  # [num_blocks_of_seq] int
    seq_len: int,
    layout: CellLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize one sequence's first ``seq_len`` tokens: rotated fp32 K, V ``[seq_len, H, D]``."""
    check_paged_cache(kv_cache, layout)
    block_size = kv_cache.shape[2]
    needed = -(-seq_len // block_size)
    cells = kv_cache[block_table[:needed].long()]  # [n, H, bs, C]
    cells = cells.transpose(1, 2).flatten(0, 1)[:seq_len]  # [seq_len, H, C]
    return decode_cells_rotated(cells, layout)


def decode_cells_rotated(cells: torch.Tensor, layout: CellLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells ``[..., cell_bytes]`` -> rotated fp32 K and V ``[..., D]`` (the K row starts the cell)."""
    key = decode_rows_rotated(cells[..., : layout.key.row_bytes], layout.key)
    value = decode_rows_rotated(cells[..., layout.value_offset : layout.cell_bytes], layout.value)
    return key, value


def check_paged_cache(kv_cache: torch.Tensor, layout: CellLayout) -> None:
    if kv_cache.dtype != torch.uint8 or kv_cache.dim() != 4 or kv_cache.shape[-1] != layout.cell_bytes:
        raise ValueError(
            f"nf4 cache must be uint8 [num_blocks, num_kv_heads, block_size, {layout.cell_bytes}], "
            f"got {kv_cache.dtype} {tuple(kv_cache.shape)}"
        )
