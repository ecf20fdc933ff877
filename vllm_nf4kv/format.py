"""The NF4 KV-cache format: every constant and byte offset lives here.

Everything else (the reference codec, the Triton kernels, the vLLM backends, the
planner) imports from this module; nothing retypes a constant. ``docs/format.md``
is the human-readable copy of what this module defines.

One cache *cell* holds one token of one KV head, K and V together::

    [ K codes | K scale codes | V codes | V scale codes ]

* codes: ``head_dim`` 4-bit NormalFloat indices, two per byte, the element with
  the even index in the HIGH nibble (the bitsandbytes order);
* scale codes: one byte per group of ``group_size`` consecutive (rotated)
  values, an unsigned 8-bit float ``ue5m3`` (see :func:`scale_code_value`).

The values are quantized after a seeded, randomized Hadamard rotation of each
head vector (see :mod:`vllm_nf4kv.rotation`); attention runs in the rotated
space, which is exact because the rotation is orthogonal.
"""

from __future__ import annotations

from dataclasses import dataclass

KV_CACHE_DTYPE = "nf4"  # the --kv-cache-dtype value this plugin adds

# The 16 NF4 levels exactly as bitsandbytes hard-codes them
# (bitsandbytes/functional.py, ``get_4bit_type("nf4")``; generated there by
# ``create_normal_map(offset=0.9677083, use_extra_value=True)``).
# ``tests/test_format.py`` checks the table against that construction.
NF4_LEVELS: tuple[float, ...] = (
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
)
NF4_ZERO_CODE = 7  # index of 0.0 in NF4_LEVELS: what an all-zero group stores

# ue5m3: an unsigned 8-bit float for group scales (no sign bit is needed).
# code 0 is exactly 0.0; code c > 0 is (1 + m / 8) * 2 ** (e - SCALE_EXP_BIAS)
# with e = c >> 3 and m = c & 7 (so 2**-16 itself, e = m = 0, is the zero code).
# The range 1.125 * 2**-16 .. 61440 covers every finite
# fp16/bf16 activation scale that matters without a second-level constant, so
# a paged block can be filled one token at a time.
SCALE_EXP_BITS = 5
SCALE_MANTISSA_BITS = 3
SCALE_EXP_BIAS = 16
SCALE_CODE_MIN = 1
SCALE_CODE_MAX = 255
SCALE_MIN = (1 + 1 / 8) * 2.0**-SCALE_EXP_BIAS  # code 1
SCALE_MAX = (1 + 7 / 8) * 2.0 ** (31 - SCALE_EXP_BIAS)

# Shipped default, chosen by ``vllm-nf4kv ablate`` (docs/format.md): four scale
# bytes per head vector, i.e. exactly the bytes int4_per_token_head spends.
SCALE_BYTES_PER_ROW = 4
DEFAULT_SEARCH_STEPS = 4  # MSE scale search: the ceil code and 3 codes below it
ROTATION_SEED = 0x4E46  # "NF": fixed so every process builds the same rotation
MIN_GROUP_SIZE = 16


def scale_code_value(code: int) -> float:
    """Value of one ue5m3 scale code (the ground truth the codecs are tested against)."""
    if not 0 <= code <= SCALE_CODE_MAX:
        raise ValueError(f"scale code must be in [0, 255], got {code}")
    if code == 0:
        return 0.0
    exponent, mantissa = code >> SCALE_MANTISSA_BITS, code & 7
    return (1 + mantissa / 8) * 2.0 ** (exponent - SCALE_EXP_BIAS)


def default_group_size(head_dim: int) -> int:
    """Group size for a head size: ``head_dim / 4``, but never below 16.

    Four one-byte scales per head vector cost exactly what vLLM's
    ``int4_per_token_head`` spends on its fp32 scale, so NF4 never uses more
    bytes per token at any head size (4.5 bits/value at 64, 4.25 at 128).
    """
    check_head_dim(head_dim)
    return max(MIN_GROUP_SIZE, head_dim // SCALE_BYTES_PER_ROW)


def check_head_dim(head_dim: int) -> None:
    """Refuse head sizes the format cannot hold, with the rule in the message."""
    if head_dim <= 0 or head_dim % MIN_GROUP_SIZE != 0:
        raise ValueError(
            f"nf4 KV cache needs head_dim to be a positive multiple of "
            f"{MIN_GROUP_SIZE}, got {head_dim}; use --kv-cache-dtype auto or fp8 "
            f"for this model"
        )


@dataclass(frozen=True)
class RowFormat:
    """How one K or V head vector is stored: codes then scale codes."""

    head_dim: int
    group_size: int

    def __post_init__(self) -> None:
        check_head_dim(self.head_dim)
        if self.group_size < 2 or self.head_dim % self.group_size != 0:
            raise ValueError(
                f"group_size must divide head_dim={self.head_dim}, got {self.group_size}"
            )
        if self.group_size % 2 != 0:
            raise ValueError(f"group_size must be even (two codes a byte), got {self.group_size}")

    @property
    def num_groups(self) -> int:
        return self.head_dim // self.group_size

    @property
    def code_bytes(self) -> int:
        return self.head_dim // 2

    @property
    def row_bytes(self) -> int:
        return self.code_bytes + self.num_groups

    @property
    def bits_per_value(self) -> float:
        return 8 * self.row_bytes / self.head_dim


@dataclass(frozen=True)
class CellLayout:
    """Byte offsets of one (token, KV head) cell of a paged NF4 block."""

    key: RowFormat
    value: RowFormat

    @classmethod
    def for_head_dim(cls, head_dim: int) -> CellLayout:
        group = default_group_size(head_dim)
        return cls(RowFormat(head_dim, group), RowFormat(head_dim, group))

    @property
    def head_dim(self) -> int:
        return self.key.head_dim

    @property
    def key_offset(self) -> int:
        return 0

    @property
    def value_offset(self) -> int:
        return self.key.row_bytes

    @property
    def cell_bytes(self) -> int:
        return self.key.row_bytes + self.value.row_bytes

    @property
    def bits_per_value(self) -> float:
        return 8 * self.cell_bytes / (2 * self.head_dim)


def cell_bytes(head_dim: int) -> int:
    """Bytes per token and KV head (K and V) of the default layout."""
    return CellLayout.for_head_dim(head_dim).cell_bytes
