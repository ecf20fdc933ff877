"""Make ``--kv-cache-dtype nf4`` exist in the running vLLM, in one step.

Accepting the dtype and routing it to the NF4 backend are inseparable: a vLLM
that accepts "nf4" but keeps its own kernels would read uint8 NF4 pages as fp8
and answer with garbage. So both happen here, and both are checked.

vLLM APIs are feature-detected, never compared by version string:
``register_kv_cache_dtype`` (vLLM 0.33, 0.34) is used when present; otherwise the
0.32 patch in :mod:`vllm_nf4kv.patches` extends the closed dtype table.
"""

from __future__ import annotations

from vllm_nf4kv.format import KV_CACHE_DTYPE
from vllm_nf4kv.journal import SUPPORTED_VLLM, UnsupportedVLLMError, is_wrapper
from vllm_nf4kv.self_check import NF4_FEATURE, check_nf4_dtype, nf4_is_accepted, run_self_check


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise UnsupportedVLLMError(
            f"vllm-nf4kv needs {what}, which this vLLM does not have; "
            f"supported: {SUPPORTED_VLLM}. --kv-cache-dtype nf4 is not available."
        )


def check_vllm_features() -> None:
    """Refuse vLLM versions whose backend / spec APIs differ from what we build on."""
    from vllm.v1.attention.backend import AttentionBackend
    from vllm.v1.kv_cache_interface import AttentionSpec

    _require(hasattr(AttentionBackend, "customize_spec"), "AttentionBackend.customize_spec")
    _require("state_content_bytes" in AttentionSpec.__dataclass_fields__, "AttentionSpec.state_content_bytes")
    _require(
        hasattr(AttentionBackend, "forward_includes_kv_cache_update"),
        "AttentionBackend.forward_includes_kv_cache_update",
    )


def _register_with_hook(register_kv_cache_dtype) -> None:  # noqa: ANN001
    import torch
    from vllm.v1.kv_cache_interface import KVQuantMode

    @register_kv_cache_dtype(KV_CACHE_DTYPE)
    class NF4KVCacheDType:
        """0.33 handler. ``quant_mode`` is NONE on purpose: generic kernels must
        not claim these pages (CUSTOM aliases another mode's number in 0.33.0),
        and the NF4 backend, chosen by the platform routing, owns all of it."""

        name = KV_CACHE_DTYPE

        def torch_dtype(self) -> torch.dtype:
            return torch.uint8

        def quant_mode(self) -> KVQuantMode:
            return KVQuantMode.NONE


def register_nf4_kv_cache_dtype() -> None:
    """Accept ``nf4``, route it to the NF4 backend, and verify both took effect.

    Raises when any of it fails; ``plugin.register`` then undoes what was done
    (:func:`vllm_nf4kv.journal.undo_to`), so nf4 is never accepted unrouted.
    """
    from vllm.config import cache as cache_module

    from vllm_nf4kv import patches

    check_vllm_features()
    hook = getattr(cache_module, "register_kv_cache_dtype", None)
    if hook is not None:
        if KV_CACHE_DTYPE not in getattr(cache_module, "KV_CACHE_DTYPES", ()):
            patches.undo_on_failure_kv_cache_dtype_hook()
            _register_with_hook(hook)
    else:
        patches.accept_nf4_cache_dtype_without_hook()
    patches.route_nf4_to_plugin_backend()
    patches.check_nf4_quality_after_loading()  # refuses uncalibrated nf4 on biased keys

    from vllm.platforms import current_platform

    routed = is_wrapper(type(current_platform).get_attn_backend_cls)
    if not (nf4_is_accepted() and routed):
        raise UnsupportedVLLMError(
            f"vllm-nf4kv could not install --kv-cache-dtype nf4 (accepted={nf4_is_accepted()}, "
            f"backend routed={routed}); supported: {SUPPORTED_VLLM}"
        )
    run_self_check(NF4_FEATURE, check_nf4_dtype)
