"""What the CPU and CUDA NF4 backends share: the page spec, the name, the refusals."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

from vllm.v1.attention.backend import AttentionType
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_nf4kv.format import KV_CACHE_DTYPE, CellLayout


def nf4_spec(spec: AttentionSpec) -> AttentionSpec:
    """The spec with the packed NF4 cell size, so vLLM sizes pages (and capacity) by it."""
    if spec.state_content_bytes is not None:
        return spec
    return replace(spec, state_content_bytes=CellLayout.for_head_dim(spec.head_size).cell_bytes)


class NF4BackendMixin:
    """Put first in the bases of an NF4 backend: its answers win over the base backend's."""

    supported_kv_cache_dtypes: ClassVar[list] = [KV_CACHE_DTYPE]

    @staticmethod
    def get_name() -> str:
        # vLLM looks the name up in AttentionBackendEnum; CUSTOM is the slot for
        # third-party backends.
        return "CUSTOM"

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        return nf4_spec(spec)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


def refuse_unsupported(platform: str, kv_cache_dtype: str, attn_type: str, **features: Any) -> None:
    """Raise one ``ValueError`` naming every requested feature the NF4 backend lacks.

    ``features`` maps a human name ("ALiBi slopes") to the layer's value for it;
    a truthy value means the layer asks for it.
    """
    refused = [name for name, value in features.items() if value is not None and value is not False]
    if kv_cache_dtype != KV_CACHE_DTYPE:
        refused.insert(0, f"kv_cache_dtype {kv_cache_dtype!r} (this backend stores only nf4)")
    if attn_type != AttentionType.DECODER:
        refused.append(f"attention type {attn_type!r}")
    if refused:
        raise ValueError(
            f"--kv-cache-dtype nf4 on {platform} does not support " + ", ".join(refused)
            + "; use --kv-cache-dtype auto or fp8 for this model"
        )
