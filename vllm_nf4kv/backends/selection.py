"""Which backend serves ``--kv-cache-dtype nf4``, and every refusal, in one place.

Two moments, both before the first forward pass, so an unsupported model stops the
engine at startup with a message that names the flag to change:

* :func:`select_nf4_backend`, called from the platform routing patch
  (:mod:`vllm_nf4kv.patches`) once per attention layer while the model is built, with
  what vLLM's selector knows (head size, MLA, sinks, sliding window, a forced backend);
* :func:`check_layer`, called by the backends' ``AttentionImpl.__init__`` (also while the
  model is built) with what only the layer knows (query and KV head counts, ALiBi,
  soft-capping).

Both check the chosen implementation's :mod:`vllm_nf4kv.kernel_limits` against the
layout :func:`vllm_nf4kv.format.format_for` gives, so a kernel never sees a shape it
cannot run. The C++ kernels' limits apply to the CPU platform whether or not they are
built: a model that runs on a machine with a compiler runs on one without.
"""

from __future__ import annotations

from typing import Any

from vllm_nf4kv.format import KV_CACHE_DTYPE, CellLayout, check_head_dim, format_for
from vllm_nf4kv.kernel_limits import CPU_LIMITS, CUDA_LIMITS, KernelLimits

CPU_BACKEND = "vllm_nf4kv.backends.cpu_attn.NF4CPUAttentionBackend"
CUDA_BACKEND = "vllm_nf4kv.backends.triton_attn.NF4TritonAttentionBackend"
LIMITS = {"cpu": CPU_LIMITS, "cuda": CUDA_LIMITS}

# Backends a user may force with --attention-backend together with nf4: the
# platform's default (which nf4 replaces) and CUSTOM.
_COMPATIBLE_FORCED = {"cpu": ("CPU_ATTN", "CUSTOM"), "cuda": ("TRITON_ATTN", "CUSTOM")}
_USE_ANOTHER = "; use --kv-cache-dtype auto or fp8 for this model"


def select_nf4_backend(platform: Any, selected_backend: Any, config: Any) -> str:
    """Return the class path of the nf4 backend, or raise ``ValueError`` saying why not."""
    from vllm.v1.attention.backend import AttentionType

    if config.use_mla or config.use_sparse:
        raise ValueError(
            "--kv-cache-dtype nf4 stores K and V per KV head and cannot hold MLA "
            "(latent) caches" + _USE_ANOTHER
        )
    if config.attn_type != AttentionType.DECODER:
        raise ValueError(
            f"--kv-cache-dtype nf4 supports decoder self-attention only, got "
            f"attention type {config.attn_type!r}; use --kv-cache-dtype auto"
        )
    if config.has_sink:
        raise ValueError("--kv-cache-dtype nf4 does not support attention sinks yet" + _USE_ANOTHER)
    if getattr(config, "use_mm_prefix", False):
        raise ValueError(
            "--kv-cache-dtype nf4 does not support full (bidirectional) attention over multimodal "
            "prefixes yet (this model attends to its image tokens both ways)" + _USE_ANOTHER
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
    limits = LIMITS[kind]
    refused = limits.layout_refusals(format_for(KV_CACHE_DTYPE, config.head_size))
    if getattr(config, "has_sliding_window", False) and not limits.sliding_window:
        refused.append("sliding-window attention")
    _raise_if(limits, refused)
    return CPU_BACKEND if kind == "cpu" else CUDA_BACKEND


def check_layer(
    kind: str,
    *,
    kv_cache_dtype: str,
    attn_type: str,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    sliding_window: int | None,
    alibi_slopes: Any,
    logits_soft_cap: float | None,
    sinks: Any,
    kv_sharing_target_layer_name: str | None = None,
) -> CellLayout:
    """Refuse what one attention layer asks for and ``kind``'s kernels cannot do; return its layout.

    Raises one ``ValueError`` naming every refused feature at once.
    """
    from vllm.v1.attention.backend import AttentionType

    limits = LIMITS[kind]
    refused: list[str] = []
    if kv_cache_dtype != KV_CACHE_DTYPE:
        refused.append(f"kv_cache_dtype {kv_cache_dtype!r} (this backend stores only nf4)")
    if attn_type != AttentionType.DECODER:
        refused.append(f"attention type {attn_type!r}")
    if alibi_slopes is not None:
        refused.append("ALiBi slopes")
    if logits_soft_cap:
        refused.append("logits soft-capping")
    if sinks is not None:
        refused.append("attention sinks")
    if kv_sharing_target_layer_name is not None:
        # Gemma 3n / 4: this layer reads another layer's cache (keys stored with that layer's
        # calibration) and is called with key=None; neither the transform nor calibrate fits.
        refused.append(f"KV-cache sharing (this layer reads {kv_sharing_target_layer_name!r}'s cache)")
    if sliding_window and sliding_window > 0 and not limits.sliding_window:
        refused.append("sliding windows")
    gqa = limits.gqa_refusal(num_heads, num_kv_heads)
    if gqa is not None:
        refused.append(gqa)
    layout = format_for(KV_CACHE_DTYPE, head_size)  # refuses head sizes no nf4 cell can hold
    refused += limits.layout_refusals(layout)
    _raise_if(limits, refused)
    return layout


def _raise_if(limits: KernelLimits, refused: list[str]) -> None:
    if refused:
        raise ValueError(
            f"--kv-cache-dtype nf4 on {limits.platform} does not support " + ", ".join(refused) + _USE_ANOTHER
        )
