"""What this machine's CPU lets vLLM run, for tests that need it (skipped with the reason elsewhere)."""

from __future__ import annotations

import pytest
import torch


def cpu_runs_fp8_kv() -> bool:
    """Whether vLLM's CPU attention serves ``--kv-cache-dtype fp8`` on this machine.

    The same test as vLLM's own (``vllm/v1/attention/backends/cpu_attn.py``,
    ``_get_attn_isa``): AVX-512 or AMX; elsewhere vLLM refuses fp8 at startup.
    """
    return bool(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())


requires_cpu_fp8 = pytest.mark.skipif(
    not cpu_runs_fp8_kv(),
    reason="vLLM's CPU backend runs an fp8 KV cache only with AVX-512 or AMX; this CPU has neither",
)
