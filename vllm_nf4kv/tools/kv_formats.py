"""Fake-quantized KV formats for the ablation and the quality report.

A *format* maps head vectors ``[..., head_dim]`` to their round trip through a
cache format, in the caller's dtype, and says how many bits per value it
stores (every scale byte included). Every NF4 row the stored format can hold
(``ue5m3`` per group or two-level ``rB`` scales, any group size and search) is
the reference codec itself: :func:`vllm_nf4kv.reference.fake_quantize_rows` on
the :class:`~vllm_nf4kv.format.RowFormat` its spec names (``-norot``: the
reference's ``quantize_rows`` / ``decode_rows_rotated`` without the rotation).
Only what the stored format cannot hold by design is built here, from the
reference's primitives (sanitize, NF4 levels, its scale search
:func:`~vllm_nf4kv.reference.best_of_scales`, the Hadamard rotation):

* other group scale codes (fp32, fp16, e4m3, ue4m4);
* vLLM's ``fp8`` (e4m3, unit scale) and an emulation of its
  ``int4_per_token_head`` (randomized Hadamard, asymmetric uint4 per token and
  head, fp32 scale with the 4-bit zero-point hidden in its low mantissa bits).

Formats are named by a spec string, so every row of an ablation table can be
re-run exactly (see :func:`parse_format`)::

    bf16 | fp8 | int4tok | nf4-g{G}-{fp32,fp16,e4m3,ue4m4,ue5m3,r1..r8}-s{N}[-norot]

``sN`` is the MSE scale search: ``s1`` takes the smallest scale that covers the
group's absmax (no clipping); ``sN`` also tries ``N - 1`` smaller scales and
keeps the one with the least squared error. For 8-bit codes the smaller scales
are the next codes down (as :func:`vllm_nf4kv.reference.quantize_groups`
does); for fp32/fp16 they are ``absmax * 2**(-k/8)``, the spacing of a 3-bit
mantissa, so the search is comparable.

``rB`` is a two-level scale (double quantization): one ue5m3 code per head
vector (the ceil of the vector's absmax) and a ``B``-bit code per group, group
scale ``= row_scale * format.relative_ladder(B)[k]`` (the stored rows' ladder,
``ScaleScheme.TWO_LEVEL``; the search is :func:`vllm_nf4kv.reference.quantize_two_level`'s).
Scale bytes per vector: ``1 + ceil(groups * B / 8)``, e.g. ``nf4-g8-r3`` spends 4
like ``nf4-g16-ue5m3``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cache

import torch

from vllm_nf4kv.format import RowFormat, ScaleScheme, int4_per_token_head_bytes
from vllm_nf4kv.reference import (
    best_of_scales,
    decode_rows_rotated,
    fake_quantize_rows,
    nf4_levels,
    prepare_rows,
    quantize_rows,
    sanitize,
)
from vllm_nf4kv.rotation import rotate, unrotate

# bytes of one group scale code, by scale format
SCALE_FORMAT_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "e4m3": 1, "ue4m4": 1, "ue5m3": 1}
_DENSE_SCALE_FORMATS = ("fp32", "fp16")  # searched on a ratio grid, not code by code
_UE4M4_BIAS = 8  # ue4m4 (ablation only): 2**-8 .. 248, one more mantissa bit than ue5m3
_FP8_MAX = 448.0  # largest finite float8_e4m3fn


class KVFormat:
    """A round trip through one cache format, for one of K or V."""

    spec: str

    def bits_per_value(self, head_dim: int) -> float:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [..., head_dim] -> same
        raise NotImplementedError


@dataclass(frozen=True)
class Passthrough(KVFormat):
    """No quantization beyond a cast to ``dtype`` (``fp32`` is the baseline)."""

    spec: str
    dtype: torch.dtype

    def bits_per_value(self, head_dim: int) -> float:
        return float(torch.finfo(self.dtype).bits)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype).to(x.dtype)


@dataclass(frozen=True)
class Fp8E4M3(KVFormat):
    """vLLM's ``--kv-cache-dtype fp8`` with its default unit scale: saturating e4m3 cast."""

    spec: str = "fp8"

    def bits_per_value(self, head_dim: int) -> float:
        return 8.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = sanitize(x).clamp(-_FP8_MAX, _FP8_MAX)
        return y.to(torch.float8_e4m3fn).to(x.dtype)


@dataclass(frozen=True)
class Int4PerTokenHead(KVFormat):
    """Emulation of vLLM 0.33's ``int4_per_token_head`` write + read path.

    Read from ``vllm/v1/attention/ops/int4_per_token_head.py``: rotate by an
    *unnormalized* randomized Hadamard ``H D x``; per (token, head)
    ``scale = max((max - min) / 15, 1e-6)``, ``zp = round(-min / scale)`` in
    [0, 15], ``q = clamp(round(x / scale + zp), 0, 15)`` (round half away from
    zero); the stored fp32 scale has its 4 low mantissa bits replaced by ``zp``,
    and the reader decodes ``(q - zp) * truncated_scale``. Differences: our
    rotation's sign vector (any fixed signs do), and the rotation runs in fp32
    (vLLM casts the rotated vector back to the model dtype first).
    """

    spec: str = "int4tok"

    def bits_per_value(self, head_dim: int) -> float:
        return 8 * int4_per_token_head_bytes(head_dim) / head_dim

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        head_dim = x.shape[-1]
        norm = float(_largest_power_of_two_divisor(head_dim)) ** 0.5
        y = rotate(sanitize(x)) * norm  # [..., D], H D x unnormalized
        lo, hi = y.amin(-1, keepdim=True), y.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15.0).clamp_min(1e-6)
        zp = _round_half_away(-lo / scale).clamp(0, 15)
        q = _round_half_away(y * (1.0 / scale) + zp).clamp(0, 15)
        stored = (scale.view(torch.int32) & -16).view(torch.float32)
        return unrotate((q - zp) * stored / norm).to(x.dtype)


@dataclass(frozen=True)
class NF4Groups(KVFormat):
    """NF4 codes with one scale per ``group`` values in a chosen scale format.

    The scale codes the stored rows can use (``ue5m3`` per group, two-level ``rB``) are the
    reference codec itself, on the :class:`~vllm_nf4kv.format.RowFormat` the spec names; the
    others pick their candidate scales here and share the reference's search
    (:func:`~vllm_nf4kv.reference.best_of_scales`).
    """

    spec: str
    group: int
    scale_format: str
    search_steps: int
    rotate: bool

    def row_format(self, head_dim: int) -> RowFormat | None:
        """The stored row this spec is at ``head_dim``, or None for an ablation-only scale code."""
        bits = _relative_bits(self.scale_format)
        if bits:
            return RowFormat(head_dim, self.group, self.search_steps, ScaleScheme.TWO_LEVEL, bits)
        if self.scale_format == ScaleScheme.UE5M3_PER_GROUP.value:
            return RowFormat(head_dim, self.group, self.search_steps)
        return None

    def bits_per_value(self, head_dim: int) -> float:
        row = self.row_format(head_dim)
        if row is not None:
            return row.bits_per_value
        scale_bytes = SCALE_FORMAT_BYTES[self.scale_format] * (head_dim // self.group)
        return 8 * (head_dim / 2 + scale_bytes) / head_dim

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.group:
            raise ValueError(f"{self.spec}: head_dim {x.shape[-1]} is not a multiple of {self.group}")
        row = self.row_format(x.shape[-1])
        if row is not None and self.rotate:
            return fake_quantize_rows(x, row)  # exactly what a cache of these rows stores
        y = prepare_rows(x) if self.rotate else sanitize(x)
        out = decode_rows_rotated(quantize_rows(y, row), row) if row is not None else self._other_codes(y)
        return (unrotate(out) if self.rotate else out).to(x.dtype)

    def _other_codes(self, y: torch.Tensor) -> torch.Tensor:
        """Round trip of sanitized ``y [..., D]`` with an ablation-only scale code."""
        groups = y.unflatten(-1, (-1, self.group))  # [..., G, g]
        scales = self._candidate_scales(groups.abs().amax(-1))  # [..., G, S]
        codes, best = best_of_scales(groups, scales)
        levels = nf4_levels(y.device)[codes.long()].unflatten(-1, (-1, self.group))
        return (levels * scales.gather(-1, best)).flatten(-2)

    def _candidate_scales(self, absmax: torch.Tensor) -> torch.Tensor:
        """``[..., G]`` -> ``[..., G, S]``: the smallest scale covering absmax, then S - 1 below it."""
        device = str(absmax.device)
        if self.scale_format in _DENSE_SCALE_FORMATS:
            wanted = torch.stack([absmax * 2.0 ** (-step / 8) for step in range(self.search_steps)], -1)
            return _ceil_to_table(wanted, _fp16_table(device)) if self.scale_format == "fp16" else wanted
        table = _code_table(self.scale_format, device)  # ascending, table[0] == 0
        first = _ceil_index(absmax, table).unsqueeze(-1)
        steps = torch.arange(self.search_steps, device=absmax.device)
        return table[torch.where(first > steps, first - steps, first)]  # below code 1: the ceil code


# ---------------------------------------------------------------- spec strings

_NF4_SPEC = re.compile(r"^nf4-g(\d+)-(\w+?)-s(\d+)(-norot)?$")


def parse_format(spec: str) -> KVFormat:
    """Build a format from its spec string (the grammar is in the module docstring)."""
    passthrough = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if spec in passthrough:
        return Passthrough(spec, passthrough[spec])
    if spec == "fp8":
        return Fp8E4M3()
    if spec == "int4tok":
        return Int4PerTokenHead()
    match = _NF4_SPEC.match(spec)
    if match is None:
        raise ValueError(
            f"unknown KV format {spec!r}; expected fp32, bf16, fp16, fp8, int4tok or "
            f"nf4-g<group>-<{'|'.join(SCALE_FORMAT_BYTES)}|r1..r8>-s<steps>[-norot], e.g. nf4-g16-ue5m3-s4"
        )
    group, scale_format, steps, norot = match.groups()
    if scale_format not in SCALE_FORMAT_BYTES and not _relative_bits(scale_format):
        raise ValueError(
            f"unknown scale format {scale_format!r} in {spec!r}; "
            f"use one of {list(SCALE_FORMAT_BYTES)} or r1..r8"
        )
    if int(group) < 2 or int(group) % 2 or int(steps) < 1:
        raise ValueError(f"{spec!r}: group must be even and >= 2, search steps >= 1")
    return NF4Groups(spec, int(group), scale_format, int(steps), norot is None)


def shipped_spec(head_dim: int) -> str:
    """``KEY/VALUE``: the rows ``--kv-cache-dtype nf4`` stores at ``head_dim``, in this grammar."""
    from vllm_nf4kv.format import KV_CACHE_DTYPE, format_for

    layout = format_for(KV_CACHE_DTYPE, head_dim)
    return f"{layout.key.spec}/{layout.value.spec}"


@dataclass(frozen=True)
class StoredRows(KVFormat):
    """Exactly the K or V rows ``--kv-cache-dtype nf4`` stores at the input's head size.

    The reference codec itself (:func:`vllm_nf4kv.reference.fake_quantize_rows` on
    ``format_for``'s row), not an emulation: ablate's ``nf4`` candidate.
    """

    spec: str
    side: str  # "key" or "value"

    def row(self, head_dim: int):
        from vllm_nf4kv.format import KV_CACHE_DTYPE, format_for

        return getattr(format_for(KV_CACHE_DTYPE, head_dim), self.side)

    def bits_per_value(self, head_dim: int) -> float:
        return self.row(head_dim).bits_per_value

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from vllm_nf4kv.reference import fake_quantize_rows

        return fake_quantize_rows(x, self.row(x.shape[-1]))


# ---------------------------------------------------------------- helpers


def _relative_bits(scale_format: str) -> int:
    """B of a two-level ``rB`` scale format, 0 for the others."""
    match = re.fullmatch(r"r([1-8])", scale_format)
    return int(match.group(1)) if match else 0


def _largest_power_of_two_divisor(n: int) -> int:
    return n & -n


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _ceil_index(value: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the smallest table entry >= value (0 only for value == 0), clamped to the table."""
    index = torch.searchsorted(table, value.contiguous(), side="left")
    index = index.clamp(1, table.numel() - 1)
    return torch.where(value > 0, index, torch.zeros_like(index))


def _ceil_to_table(value: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return table[_ceil_index(value, table)]


@cache
def _code_table(scale_format: str, device: str) -> torch.Tensor:
    """All non-negative values of an ablation-only 8-bit scale code, ascending, starting with 0."""
    codes = torch.arange(256, dtype=torch.int32)
    if scale_format == "ue4m4":
        exponent, mantissa = codes >> 4, codes & 15
        values = (1 + mantissa / 16) * torch.pow(2.0, (exponent - _UE4M4_BIAS).float())
        values = torch.where(codes > 0, values, torch.zeros_like(values))
    elif scale_format == "e4m3":
        values = codes.to(torch.uint8).view(torch.float8_e4m3fn).float()
        values = values[torch.isfinite(values) & (values >= 0)]
    else:
        raise ValueError(f"no code table for scale format {scale_format!r}")
    return torch.unique(values.float()).to(device)  # sorted, one 0.0


@cache
def _fp16_table(device: str) -> torch.Tensor:
    values = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    return values.to(device)  # 0, subnormals, normals up to 65504, ascending


def bits_label(bits: float) -> str:
    return f"{bits:.3f}".rstrip("0").rstrip(".") if not math.isnan(bits) else "nan"
