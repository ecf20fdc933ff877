"""The C++ NF4 kernels for vLLM's CPU platform, built on first use.

Why C++: the PyTorch path (:mod:`vllm_nf4kv.paged_attention`) dequantizes
every page a step reads into fp32 tensors and runs attention in fp64, 53-75x
slower per decode step than ``csrc/nf4_cpu.cpp``, which dequantizes small
tiles inside the attention loops instead and writes cells with the reference
codec's exact arithmetic (``scripts/bench_cpu_kernels.py``).

Why built on first use (``torch.utils.cpp_extension``): the package stays pure
Python, and the kernels are compiled for the machine that runs them
(``-march=native``: AVX-512 where there is one, portable loops elsewhere).
``make install`` builds them once; the build is cached under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), keyed by the
source, the flags and this CPU's feature flags.

If they cannot be built (no C++ compiler), the backend logs why and uses the
PyTorch path: the same cache bytes, several times slower.
``NF4KV_CPU_KERNELS=0`` forces that path, e.g. to compare the two.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from functools import cache
from pathlib import Path
from typing import Any

import torch

from vllm_nf4kv.format import DEFAULT_SEARCH_STEPS, CellLayout
from vllm_nf4kv.reference import check_paged_cache, decode_scale, nf4_levels, nf4_midpoints
from vllm_nf4kv.rotation import rotation_signs
from vllm_nf4kv.settings import CPU_KERNELS

logger = logging.getLogger("vllm.nf4kv")

SOURCE = Path(__file__).with_name("csrc") / "nf4_cpu.cpp"
NAMESPACE = "nf4kv_cpu"
NATIVE = "-march=native"
# -ffp-contract=off: no a*b+c is fused implicitly, so the store kernel's
# arithmetic is the reference's, operation for operation (the attention loops
# fuse explicitly, with std::fma / _mm512_fmadd_ps).
CFLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-std=c++17"]
ENV_SWITCH = CPU_KERNELS.env_var


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build(namespace: str = NAMESPACE, arch: str = NATIVE, source: Path = SOURCE) -> Any:
    """Compile (or reuse the cached build) and return ``torch.ops.<namespace>``.

    ``arch`` is the ``-march`` flag; the tests build ``-march=x86-64-v3`` (no
    AVX-512) beside the native build to check the portable loops.
    ``source`` lets a benchmark build another version of the kernels beside
    these (under its own namespace).
    """
    from torch.utils.cpp_extension import load

    flags = [*CFLAGS, arch, f"-DNF4KV_OPS={namespace}"]
    digest = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + _cpu_flags().encode())
    load(
        name=f"{namespace}_{digest.hexdigest()[:12]}",
        sources=[str(source)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    return getattr(torch.ops, namespace)


@cache
def _native() -> Any | None:
    try:
        return build()
    except Exception as exc:  # no compiler, no ninja, a broken toolchain: all mean "fall back"
        lines = str(exc).strip().splitlines()
        logger.warning(
            "nf4 CPU kernels could not be built (%s: %s); using the PyTorch path, which writes the "
            "same cache bytes but is several times slower. Install g++ and ninja for the fast path.",
            type(exc).__name__, lines[-1] if lines else "",
        )
        return None


def available() -> bool:
    """True when the kernels are enabled and built (building them on the first call)."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    return _native() is not None


def describe() -> str:
    """One line for the startup log: which CPU attention path this process runs."""
    if not available():
        return "PyTorch reference path (C++ kernels disabled or not built)"
    return "C++ kernels, " + ("AVX-512" if _ops(None).has_avx512() else "portable loops")


def _ops(ops: Any | None) -> Any:
    if ops is not None:
        return ops
    native = _native()
    if native is None:
        raise RuntimeError(f"nf4 CPU kernels unavailable (see the log; {ENV_SWITCH}=0 disables them)")
    return native


@cache
def _tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return nf4_levels(), nf4_midpoints(), decode_scale(torch.arange(256)).contiguous()


def store(
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], as the model made it
    value: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens], < 0 skipped
    layout: CellLayout,
    search_steps: int = DEFAULT_SEARCH_STEPS,
    ops: Any | None = None,
) -> None:
    """Rotate and quantize K/V into their slots: the same bytes as :func:`reference.write_paged`."""
    check_paged_cache(kv_cache, layout)
    levels, midpoints, scales = _tables()
    _ops(ops).store(
        key.float().contiguous(), value.float().contiguous(), kv_cache, slot_mapping.long().contiguous(),
        rotation_signs(layout.head_dim), levels, midpoints, scales, layout.key.group_size,
        layout.value.group_size, search_steps,
    )


def attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], as the model made it
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes] uint8
    layout: CellLayout,
    query_start_loc: torch.Tensor,  # [num_reqs + 1]
    seq_lens: torch.Tensor,  # [num_reqs], tokens in the cache incl. this step's
    block_table: torch.Tensor,  # [num_reqs, max_blocks]
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    ops: Any | None = None,
) -> torch.Tensor:
    """Attention over NF4 pages: fp32 ``[num_tokens, Hq, D]`` (queries rotated in, outputs back).

    Rows past ``query_start_loc[-1]`` (vLLM's padding) are zero.
    """
    check_paged_cache(kv_cache, layout)
    if query.dim() != 3 or query.shape[-1] != layout.head_dim:
        raise ValueError(
            f"query must be [num_tokens, num_heads, {layout.head_dim}], got {tuple(query.shape)}"
        )
    query = query.float().contiguous()
    out = torch.zeros_like(query)
    levels, _, scales = _tables()
    _ops(ops).attention(
        query, kv_cache, block_table.int().contiguous(), rotation_signs(layout.head_dim),
        seq_lens.int().contiguous(), query_start_loc.int().contiguous(), levels, scales, float(scale),
        bool(causal), int(sliding_window or 0), layout.key.group_size, layout.value.group_size, out,
    )
    return out
