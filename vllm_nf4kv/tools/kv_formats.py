"""Fake-quantized KV formats for the ablation and the quality report.

A *format* maps head vectors ``[..., head_dim]`` to their round trip through a
cache format, in the caller's dtype, and says how many bits per value it
stores (every scale byte included). The shipped NF4 format is
:func:`vllm_nf4kv.reference.fake_quantize_rows`; the variants here reuse its
primitives (NF4 levels and encoder, ue5m3 scale codes, the Hadamard rotation)
and only add what the ablation needs to compare against:

* other group scale codes (fp32, fp16, e4m3, ue4m4, ue5m3 as shipped);
* rotation on or off; scale search on or off;
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
scale ``= row_scale * 2**(-k * 2**(1 - B))``, k = 0 .. 2**B - 1 (the ladder
always spans about a factor 4). ``sN`` starts at the smallest k whose scale
still covers the group's absmax and tries N - 1 codes below it. Scale bytes per
vector: ``1 + ceil(groups * B / 8)``, e.g. ``nf4-g8-r3`` spends 4 like
``nf4-g16-ue5m3``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cache

import torch

from vllm_nf4kv.format import int4_per_token_head_bytes
from vllm_nf4kv.reference import decode_scale, nf4_levels, nf4_midpoints, pairwise_sum, sanitize
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
    """NF4 codes with one scale per ``group`` values in a chosen scale format."""

    spec: str
    group: int
    scale_format: str
    search_steps: int
    rotate: bool

    def bits_per_value(self, head_dim: int) -> float:
        groups = head_dim // self.group
        relative_bits = _relative_bits(self.scale_format)
        if relative_bits:
            scale_bytes = 1 + -(-groups * relative_bits // 8)
        else:
            scale_bytes = SCALE_FORMAT_BYTES[self.scale_format] * groups
        return 8 * (head_dim / 2 + scale_bytes) / head_dim

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.group:
            raise ValueError(f"{self.spec}: head_dim {x.shape[-1]} is not a multiple of {self.group}")
        y = rotate(sanitize(x)) if self.rotate else sanitize(x)
        groups = y.unflatten(-1, (-1, self.group))  # [..., G, g]
        absmax = groups.abs().amax(-1)  # [..., G]
        row_scale = None
        if _relative_bits(self.scale_format):
            row_scale = _ceil_to_table(absmax.amax(-1, keepdim=True), _code_table("ue5m3", str(x.device)))
        levels, midpoints = nf4_levels(x.device), nf4_midpoints(x.device)
        best_deq: torch.Tensor | None = None
        best_err: torch.Tensor | None = None
        for step in range(self.search_steps):
            scale = self._scale(absmax, step, row_scale).unsqueeze(-1)  # [..., G, 1]
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            # bucketize counts the midpoints strictly below each value: reference.nf4_encode's
            # codes (tests/test_tools.py checks equality), 3x faster on CPU
            deq = levels[torch.bucketize((groups / safe).clamp(-1.0, 1.0), midpoints)] * scale
            err = pairwise_sum((deq - groups) ** 2).unsqueeze(-1)  # the reference's summation order
            if best_err is None or best_deq is None:
                best_deq, best_err = deq, err
            else:
                better = err < best_err  # ties keep the larger scale, as the reference does
                best_deq = torch.where(better, deq, best_deq)
                best_err = torch.where(better, err, best_err)
        assert best_deq is not None
        out = best_deq.flatten(-2)
        return (unrotate(out) if self.rotate else out).to(x.dtype)

    def _scale(self, absmax: torch.Tensor, step: int, row_scale: torch.Tensor | None) -> torch.Tensor:
        """Value of the ``step``-th candidate scale below the ceil of absmax."""
        bits = _relative_bits(self.scale_format)
        if bits:
            assert row_scale is not None
            ladder = row_scale.unsqueeze(-1) * _relative_ladder(bits, str(absmax.device))  # [..., 1, 2**B]
            first = (ladder >= absmax.unsqueeze(-1)).sum(-1) - 1  # smallest covering scale
            index = (first.clamp_min(0) + step).clamp_max(2**bits - 1)
            return torch.gather(ladder.expand(*absmax.shape, -1), -1, index.unsqueeze(-1)).squeeze(-1)
        if self.scale_format in _DENSE_SCALE_FORMATS:
            wanted = absmax * 2.0 ** (-step / 8)
            if self.scale_format == "fp16":
                return _ceil_to_table(wanted, _fp16_table(str(absmax.device)))
            return wanted
        table = _code_table(self.scale_format, str(absmax.device))  # ascending, table[0] == 0
        first = _ceil_index(absmax, table)
        index = torch.where(first > step, first - step, first)
        return table[index]


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


@cache
def _relative_ladder(bits: int, device: str) -> torch.Tensor:
    """Group scale / row scale for k = 0 .. 2**bits - 1, descending from 1."""
    k = torch.arange(2**bits, dtype=torch.float32)
    return torch.pow(2.0, -k * 2.0 ** (1 - bits)).to(device)


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
    """All non-negative values of an 8-bit scale code, ascending, starting with 0."""
    codes = torch.arange(256, dtype=torch.int32)
    if scale_format == "ue5m3":
        values = decode_scale(codes)  # the shipped decoder, code 0 == 0.0
    elif scale_format == "ue4m4":
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
