"""What the CPU and CUDA NF4 backends share: the page spec and the name (refusals: ``selection``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

from vllm.v1.attention.backend import AttentionType
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_nf4kv.format import KV_CACHE_DTYPE, MIN_GROUP_SIZE, format_for


def nf4_spec(spec: AttentionSpec) -> AttentionSpec:
    """The spec with the packed NF4 cell size, so vLLM sizes pages (and capacity) by it."""
    if spec.state_content_bytes is not None:
        return spec
    return replace(spec, state_content_bytes=format_for(KV_CACHE_DTYPE, spec.head_size).cell_bytes)


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

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        # vLLM's Triton backend says yes; the nf4 kernels are causal over every token (selection refuses)
        return False


# The context an impl built outside an engine (the backend tests) is sized for.
STANDALONE_MAX_MODEL_LEN = 32768


def current_model_config() -> Any:
    """The model config of the engine being built (``get_current_vllm_config``), or None outside one."""
    from vllm.config import get_current_vllm_config

    try:
        return get_current_vllm_config().model_config
    except AssertionError:  # no engine is being built (vLLM 0.32 asserts)
        return None


def engine_max_model_len() -> int:
    """``--max-model-len`` of the engine being built, or the standalone default."""
    model_config = current_model_config()
    return STANDALONE_MAX_MODEL_LEN if model_config is None else int(model_config.max_model_len)


def holds_head_size(head_size: int, max_head_dim: int) -> bool:
    """Whether nf4 cells and the platform's kernels take this head size (vLLM asks per backend)."""
    return head_size % MIN_GROUP_SIZE == 0 and 0 < head_size <= max_head_dim
