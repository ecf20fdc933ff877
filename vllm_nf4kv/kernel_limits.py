"""What each attention implementation can serve, so unsupported models fail at startup.

The limits are the kernels' own (fixed-size scratch arrays, register tiles, features not
written yet). They live here, not in the kernels, so that
:mod:`vllm_nf4kv.backends.selection` can refuse a model before its first forward with the
flag to change, and the C++ kernels compile against the same numbers (their generated
header, :func:`vllm_nf4kv.cpu_kernels.format_header`). Importing this module imports
neither torch nor Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_nf4kv.format import CellLayout, ScaleScheme


@dataclass(frozen=True)
class KernelLimits:
    """The largest shapes and the features one attention implementation supports."""

    platform: str  # how the refusal names it: "CPU", "CUDA"
    max_head_dim: int
    max_query_heads_per_kv_head: int | None  # None: any GQA ratio
    max_scale_groups: int | None  # scale groups per K or V row; None: any
    sliding_window: bool
    scale_schemes: tuple[ScaleScheme, ...]

    def layout_refusals(self, layout: CellLayout) -> list[str]:
        """What of ``layout`` these kernels cannot hold, one phrase each (empty: all of it)."""
        refused = []
        if layout.head_dim > self.max_head_dim:
            refused.append(f"head_dim {layout.head_dim} (at most {self.max_head_dim})")
        for name, row in (("K", layout.key), ("V", layout.value)):
            if self.max_scale_groups and row.num_groups > self.max_scale_groups:
                smallest = -(-row.head_dim // self.max_scale_groups)
                refused.append(
                    f"{row.num_groups} {name} scale groups a row (at most {self.max_scale_groups}: "
                    f"a group size of at least {smallest})"
                )
            if row.scale_scheme not in self.scale_schemes:
                refused.append(f"{name} scale scheme {row.scale_scheme.value!r}")
        return refused

    def gqa_refusal(self, num_heads: int, num_kv_heads: int) -> str | None:
        """Why ``num_heads`` query heads over ``num_kv_heads`` KV heads cannot run here, or None."""
        most = self.max_query_heads_per_kv_head
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            return f"{num_heads} query heads over {num_kv_heads} KV heads (not a multiple)"
        if most is not None and num_heads // num_kv_heads > most:
            return f"{num_heads // num_kv_heads} query heads per KV head (at most {most})"
        return None


# csrc/: a head vector lives in stack arrays of MAX_HEAD_DIM floats; one task keeps a GQA
# group's query rows in a fixed array; the AVX-512 decoders hold a row's scales in one
# 16-lane register.
CPU_LIMITS = KernelLimits(
    platform="CPU",
    max_head_dim=512,
    max_query_heads_per_kv_head=64,
    max_scale_groups=16,
    sliding_window=True,
    scale_schemes=(ScaleScheme.UE5M3_PER_GROUP, ScaleScheme.TWO_LEVEL),
)

# kernels/triton_attention.py: two [TILE_N, head_dim / 2] fp32 tiles per K and V live in
# registers, beside a running and a chunk accumulator (head_dim 256 compiles for sm_90 with
# ~1 KB of spills a thread, docs/performance.md "On a GPU"); no sliding window yet; both
# scale schemes, K and V independently (kernels/triton_codec.py).
CUDA_LIMITS = KernelLimits(
    platform="CUDA",
    max_head_dim=256,
    max_query_heads_per_kv_head=None,
    max_scale_groups=None,
    sliding_window=False,
    scale_schemes=(ScaleScheme.UE5M3_PER_GROUP, ScaleScheme.TWO_LEVEL),
)
