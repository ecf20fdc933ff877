"""The NF4 KV-cache format: every constant and byte offset lives here.

Everything else (the reference codec, the Triton kernels, the vLLM backends, the
planner) imports from this module; nothing retypes a constant. ``docs/format.md``
is the human-readable copy of what this module defines.

One cache *cell* holds one token of one KV head, K and V together::

    [ K codes | K scale codes | V codes | V scale codes ]

* codes: ``head_dim`` 4-bit NormalFloat indices, two per byte, the element with
  the even index in the HIGH nibble (the bitsandbytes order);
* scale codes: how a row stores the scale of each group of ``group_size``
  consecutive (rotated) values is its :class:`ScaleScheme`: one unsigned 8-bit
  float ``ue5m3`` per group (see :func:`scale_code_value`), or two levels, one
  ue5m3 code per row and a ``relative_bits``-bit code per group on a fixed
  ladder below it (see :func:`relative_ladder`).

What ``--kv-cache-dtype nf4`` stores (:func:`format_for`): keys in 8 groups with
two-level 5-bit scales, values in 2 groups with ue5m3 scales, 8 scale bytes per
cell at every head size, exactly what ``int4_per_token_head`` spends
(``docs/format.md``, "Ablation", has the measurements behind the choice).

A :class:`RowFormat` carries everything that decides a row's bytes (group size,
scale scheme, search steps) and every offset; a :class:`CellLayout` pairs the K
and V rows; :func:`format_for` says which layout a ``--kv-cache-dtype`` stores.
The C++ kernels compile against a header generated from this module
(:mod:`vllm_nf4kv.cpu_kernels`), Triton takes these values as constexprs.

The values are quantized after a seeded, randomized Hadamard rotation of each
head vector (see :mod:`vllm_nf4kv.rotation`); attention runs in the rotated
space, which is exact because the rotation is orthogonal.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
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
SCALE_MANTISSA_BITS = 3
SCALE_MANTISSA_MASK = (1 << SCALE_MANTISSA_BITS) - 1
SCALE_EXP_BIAS = 16
SCALE_CODE_MIN = 1
SCALE_CODE_MAX = 255
SCALE_MIN = (1 + 1 / 8) * 2.0**-SCALE_EXP_BIAS  # code 1
SCALE_MAX = (1 + SCALE_MANTISSA_MASK / 8) * 2.0 ** ((SCALE_CODE_MAX >> SCALE_MANTISSA_BITS) - SCALE_EXP_BIAS)

# The fp32 facts the scale codec computes with (codes are built from and into
# fp32 bit patterns, never with log2 / exp2, so every implementation agrees).
FP32_MANTISSA_BITS = 23
FP32_EXP_BIAS = 127
SCALE_DROPPED_BITS = FP32_MANTISSA_BITS - SCALE_MANTISSA_BITS  # fp32 mantissa bits a code drops

# NF4 codes: two a byte, the even element in the high nibble.
CODE_BITS = 4
CODE_MASK = (1 << CODE_BITS) - 1
NUM_LEVELS = len(NF4_LEVELS)
NUM_MIDPOINTS = NUM_LEVELS - 1

# Shipped default, chosen by ``vllm-nf4kv ablate`` (docs/format.md): keys carry most of the
# error, so they get 6 of a cell's 8 scale bytes (8 groups, two-level 5-bit scales, an
# 8-candidate search), values 2 (2 groups of ue5m3); 8 is what int4_per_token_head spends.
KEY_GROUPS = 8
KEY_RELATIVE_BITS = 5
KEY_SEARCH_STEPS = 8
VALUE_GROUPS = 2
VALUE_SEARCH_STEPS = 4
DEFAULT_SEARCH_STEPS = 4  # MSE scale search: the ceil code and 3 codes below it
MAX_RELATIVE_BITS = 8  # a relative code fits a byte
ROTATION_SEED = 0x4E46  # "NF": fixed so every process builds the same rotation
MIN_GROUP_SIZE = 16


def scale_code_value(code: int) -> float:
    """Value of one ue5m3 scale code (the ground truth the codecs are tested against)."""
    if not 0 <= code <= SCALE_CODE_MAX:
        raise ValueError(f"scale code must be in [0, {SCALE_CODE_MAX}], got {code}")
    if code == 0:
        return 0.0
    exponent, mantissa = code >> SCALE_MANTISSA_BITS, code & SCALE_MANTISSA_MASK
    return (1 + mantissa / 8) * 2.0 ** (exponent - SCALE_EXP_BIAS)


def int4_per_token_head_bytes(head_dim: int) -> int:
    """Bytes vLLM's ``int4_per_token_head`` spends per token, KV head and K or V row.

    ``head_dim / 2`` bytes of 4-bit codes and one fp32 scale (its zero point hidden in the
    scale's low mantissa bits): the budget no nf4 row may exceed.
    """
    return head_dim // 2 + 4


def check_head_dim(head_dim: int) -> None:
    """Refuse head sizes the format cannot hold, with the rule in the message."""
    if head_dim <= 0 or head_dim % MIN_GROUP_SIZE != 0:
        raise ValueError(
            f"nf4 KV cache needs head_dim to be a positive multiple of "
            f"{MIN_GROUP_SIZE}, got {head_dim}; use --kv-cache-dtype auto or fp8 "
            f"for this model"
        )


class ScaleScheme(enum.Enum):
    """How a row stores its group scales; every kernel says which schemes it implements.

    ``UE5M3_PER_GROUP``: one ue5m3 byte per group, groups in order after the codes (the
    shipped value rows).

    ``TWO_LEVEL``: the shipped key rows. One ue5m3 *row code*, the smallest that covers the
    row's absmax, then one ``B = relative_bits``-bit *relative code* ``k`` per group, packed
    LSB first (group ``j`` holds bits ``B*j .. B*j + B - 1`` of the little-endian bytes after
    the row code). A group's scale is ``row_scale * relative_ladder(B)[k]`` in fp32: a ladder
    ``2**(-k * 2**(1 - B))`` that spans about a factor 4 below the row scale in steps of
    ``2**(2**(1 - B))`` (4.4% at B = 5, against ue5m3's 12.5% mantissa steps), so small groups
    get fine scales for fewer bits than a byte each.

    A new scheme adds a member here, its byte count in :attr:`RowFormat.scale_bytes`, and a
    case to each codec (tests/test_conformance.py runs every registered format through every
    implementation).
    """

    UE5M3_PER_GROUP = "ue5m3"
    TWO_LEVEL = "two-level"


@dataclass(frozen=True)
class RowFormat:
    """How one K or V head vector is stored: codes, then scale codes.

    ``search_steps`` belongs to the format because it decides the bytes written: the store
    tries the ceil scale code and ``search_steps - 1`` codes below it and keeps the one
    with the least squared error, so two implementations agree only with the same value.
    """

    head_dim: int
    group_size: int
    search_steps: int = DEFAULT_SEARCH_STEPS
    scale_scheme: ScaleScheme = ScaleScheme.UE5M3_PER_GROUP
    relative_bits: int = 0  # B of a TWO_LEVEL row's group codes; 0 for UE5M3_PER_GROUP

    def __post_init__(self) -> None:
        check_head_dim(self.head_dim)
        if self.group_size < 2 or self.head_dim % self.group_size != 0:
            raise ValueError(
                f"group_size must divide head_dim={self.head_dim}, got {self.group_size}"
            )
        if self.group_size % 2 != 0:
            raise ValueError(f"group_size must be even (two codes a byte), got {self.group_size}")
        if self.search_steps < 1:
            raise ValueError(f"search_steps must be >= 1, got {self.search_steps}")
        two_level = self.scale_scheme is ScaleScheme.TWO_LEVEL
        if two_level and not 1 <= self.relative_bits <= MAX_RELATIVE_BITS:
            raise ValueError(
                f"a two-level row needs relative_bits in [1, {MAX_RELATIVE_BITS}], got {self.relative_bits}"
            )
        if not two_level and self.relative_bits != 0:
            raise ValueError(f"relative_bits is for two-level rows only, got {self.relative_bits} for {self}")

    @property
    def num_groups(self) -> int:
        return self.head_dim // self.group_size

    @property
    def code_offset(self) -> int:
        """Where the packed codes start within the row."""
        return 0

    @property
    def code_bytes(self) -> int:
        return self.head_dim * CODE_BITS // 8

    @property
    def scale_offset(self) -> int:
        """Where the scale codes start within the row (right after the codes)."""
        return self.code_offset + self.code_bytes

    @property
    def scale_bytes(self) -> int:
        if self.scale_scheme is ScaleScheme.TWO_LEVEL:
            return 1 + -(-self.num_groups * self.relative_bits // 8)  # row code + packed group codes
        return self.num_groups  # UE5M3_PER_GROUP: one byte a group

    @property
    def spec(self) -> str:
        """The row in ``vllm-nf4kv ablate``'s grammar (``nf4-g16-ue5m3-s4``, ``nf4-g8-r5-s8``)."""
        two_level = self.scale_scheme is ScaleScheme.TWO_LEVEL
        scale = f"r{self.relative_bits}" if two_level else self.scale_scheme.value
        return f"nf4-g{self.group_size}-{scale}-s{self.search_steps}"

    @property
    def row_bytes(self) -> int:
        return self.code_bytes + self.scale_bytes

    @property
    def bits_per_value(self) -> float:
        return 8 * self.row_bytes / self.head_dim


@dataclass(frozen=True)
class CellLayout:
    """Byte offsets of one (token, KV head) cell of a paged NF4 block: K row, then V row."""

    key: RowFormat
    value: RowFormat

    def __post_init__(self) -> None:
        if self.key.head_dim != self.value.head_dim:
            raise ValueError(f"K and V rows differ in head_dim: {self.key.head_dim} vs {self.value.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.key.head_dim

    @property
    def value_offset(self) -> int:
        """Where the V row starts within the cell (the K row starts at 0)."""
        return self.key.row_bytes

    @property
    def cell_bytes(self) -> int:
        return self.key.row_bytes + self.value.row_bytes

    @property
    def bits_per_value(self) -> float:
        return 8 * self.cell_bytes / (2 * self.head_dim)


def relative_ladder(bits: int) -> tuple[float, ...]:
    """Group scale / row scale of a ``bits``-bit relative code ``k``: ``2**(-k * 2**(1 - bits))``, fp32.

    The fp32 values every codec multiplies the row scale by (handed to the kernels as a
    table, never recomputed there), descending from 1.0 to about 1/4.
    """
    if not 1 <= bits <= MAX_RELATIVE_BITS:
        raise ValueError(f"relative_bits must be in [1, {MAX_RELATIVE_BITS}], got {bits}")
    step = 2.0 ** (1 - bits)
    return tuple(struct.unpack("f", struct.pack("f", 2.0 ** (-k * step)))[0] for k in range(2**bits))


def _nf4_layout(head_dim: int) -> CellLayout:
    """Keys: 8 groups, two-level 5-bit scales; values: 2 groups of ue5m3 (8 scale bytes a cell).

    At head_dim 64 that is 38 + 34 = 72 bytes, 136 at 128, 264 at 256: what
    ``int4_per_token_head`` spends, at every head size.
    """
    check_head_dim(head_dim)
    key = RowFormat(
        head_dim,
        head_dim // KEY_GROUPS,
        KEY_SEARCH_STEPS,
        ScaleScheme.TWO_LEVEL,
        KEY_RELATIVE_BITS,
    )
    value = RowFormat(head_dim, head_dim // VALUE_GROUPS, VALUE_SEARCH_STEPS)
    return CellLayout(key, value)


# What each --kv-cache-dtype of this plugin stores, by head size: the one place that says it.
_REGISTRY: dict[str, Callable[[int], CellLayout]] = {KV_CACHE_DTYPE: _nf4_layout}


def format_for(kv_cache_dtype: str, head_dim: int) -> CellLayout:
    """The cell layout ``--kv-cache-dtype kv_cache_dtype`` stores at ``head_dim``."""
    if kv_cache_dtype not in _REGISTRY:
        raise ValueError(
            f"no nf4kv cell format for kv_cache_dtype {kv_cache_dtype!r}; known: {', '.join(_REGISTRY)}"
        )
    return _REGISTRY[kv_cache_dtype](head_dim)
