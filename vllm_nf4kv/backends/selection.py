"""Which backend serves ``--kv-cache-dtype nf4``, and what it refuses.

Called from the platform routing patch (:mod:`vllm_nf4kv.patches`) once per
attention layer while the model is built, so a refusal stops the engine at
startup with a message that names the flag to change.
"""

from __future__ import annotations

from typing import Any

from vllm_nf4kv.format import check_head_dim

CPU_BACKEND = "vllm_nf4kv.backends.cpu_attn.NF4CPUAttentionBackend"
CUDA_BACKEND = "vllm_nf4kv.backends.triton_attn.NF4TritonAttentionBackend"

# Backends a user may force with --attention-backend together with nf4: the
# platform's default (which nf4 replaces) and CUSTOM.
_COMPATIBLE_FORCED = {"cpu": ("CPU_ATTN", "CUSTOM"), "cuda": ("TRITON_ATTN", "CUSTOM")}


def select_nf4_backend(platform: Any, selected_backend: Any, config: Any) -> str:
    """Return the class path of the nf4 backend, or raise ``ValueError`` saying why not."""
    from vllm.v1.attention.backend import AttentionType

    if config.use_mla or config.use_sparse:
        raise ValueError(
            "--kv-cache-dtype nf4 stores K and V per KV head and cannot hold MLA "
            "(latent) caches; use --kv-cache-dtype auto or fp8 for this model"
        )
    if config.attn_type != AttentionType.DECODER:
        raise ValueError(
            f"--kv-cache-dtype nf4 supports decoder self-attention only, got "
            f"attention type {config.attn_type!r}; use --kv-cache-dtype auto"
        )
    if config.has_sink:
        raise ValueError(
            "--kv-cache-dtype nf4 does not support attention sinks yet; "
            "use --kv-cache-dtype auto or fp8 for this model"
        )
    check_head_dim(config.head_size)
    kind = "cpu" if platform.is_cpu() else "cuda" if platform.is_cuda() else None
    if kind is None:
        raise ValueError(
            f"--kv-cache-dtype nf4 runs on vLLM's CPU and CUDA platforms, "
            f"not on {platform.device_name!r}"
        )
    if selected_backend is not None and selected_backend.name not in _COMPATIBLE_FORCED[kind]:
        raise ValueError(
            f"--attention-backend {selected_backend.name} cannot read nf4 pages; "
            f"drop --attention-backend (nf4 selects its own backend) or use one of "
            f"{', '.join(_COMPATIBLE_FORCED[kind])}"
        )
    return CPU_BACKEND if kind == "cpu" else CUDA_BACKEND
