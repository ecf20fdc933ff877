"""Refusals at selection time: every unsupported configuration fails before the first forward.

``backends/selection.py`` is the one place; these tests call it as vLLM does (the
selector's real ``AttentionSelectorConfig``, the arguments of ``AttentionImpl.__init__``).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.attention.selector import AttentionSelectorConfig

from vllm_nf4kv.backends.selection import CPU_BACKEND, CUDA_BACKEND, check_layer, select_nf4_backend
from vllm_nf4kv.format import format_for
from vllm_nf4kv.kernel_limits import CPU_LIMITS, CUDA_LIMITS

CPU = SimpleNamespace(is_cpu=lambda: True, is_cuda=lambda: False, device_name="cpu")
CUDA = SimpleNamespace(is_cpu=lambda: False, is_cuda=lambda: True, device_name="cuda")


def _selector(**fields) -> AttentionSelectorConfig:
    return AttentionSelectorConfig(**{"head_size": 64, "dtype": torch.bfloat16, "kv_cache_dtype": "nf4",
                                      "block_size": 16, **fields})


def _layer(kind: str, **fields):
    args = dict(kv_cache_dtype="nf4", attn_type="decoder", num_heads=9, num_kv_heads=3, head_size=64,
                sliding_window=None, alibi_slopes=None, logits_soft_cap=None, sinks=None)
    return check_layer(kind, **{**args, **fields})


def test_supported_layers_get_the_registry_layout():
    assert _layer("cpu") == format_for("nf4", 64)
    gemma_like = _layer("cpu", sliding_window=512, head_size=256, num_heads=4, num_kv_heads=1)
    assert gemma_like == format_for("nf4", 256)
    assert select_nf4_backend(CPU, None, _selector(has_sliding_window=True)) == CPU_BACKEND
    assert select_nf4_backend(CUDA, None, _selector()) == CUDA_BACKEND


def test_gqa_above_the_cpu_kernels_limit_is_refused_at_build_time():
    most = CPU_LIMITS.max_query_heads_per_kv_head
    assert _layer("cpu", num_heads=most, num_kv_heads=1)
    with pytest.raises(ValueError, match=f"{most + 1} query heads per KV head \\(at most {most}\\)"):
        _layer("cpu", num_heads=most + 1, num_kv_heads=1)
    with pytest.raises(ValueError, match="not a multiple"):
        _layer("cpu", num_heads=10, num_kv_heads=3)


def test_head_sizes_beyond_a_platforms_kernels_are_refused():
    too_big = CPU_LIMITS.max_head_dim + 16
    with pytest.raises(ValueError, match=f"on CPU does not support head_dim {too_big}"):
        select_nf4_backend(CPU, None, _selector(head_size=too_big))
    cuda_too_big = CUDA_LIMITS.max_head_dim + 16
    with pytest.raises(ValueError, match=f"on CUDA does not support head_dim {cuda_too_big}"):
        _layer("cuda", head_size=cuda_too_big)
    with pytest.raises(ValueError, match="multiple of 16"):
        select_nf4_backend(CPU, None, _selector(head_size=72))


def test_sliding_window_on_cuda_is_refused_by_the_selector_and_the_layer():
    """The routing patch returns a class path, so vLLM never asks supports_sliding_window()."""
    with pytest.raises(ValueError, match="CUDA does not support sliding-window attention"):
        select_nf4_backend(CUDA, None, _selector(has_sliding_window=True))
    with pytest.raises(ValueError, match="sliding windows"):
        _layer("cuda", sliding_window=128)


@pytest.mark.parametrize("platform", [CPU, CUDA], ids=["cpu", "cuda"])
def test_bidirectional_multimodal_prefixes_are_refused(platform):
    """A model that attends to its image tokens both ways (``use_mm_prefix``): the nf4 kernels are
    causal over every token, so the selector refuses it instead of serving causal image attention."""
    from vllm_nf4kv.backends.cpu_attn import NF4CPUAttentionBackend

    with pytest.raises(ValueError, match="multimodal prefixes"):
        select_nf4_backend(platform, None, _selector(use_mm_prefix=True))
    assert not NF4CPUAttentionBackend.supports_mm_prefix()


def test_every_refused_feature_is_named_at_once_with_the_flag_to_change():
    with pytest.raises(ValueError) as refused:
        _layer("cpu", alibi_slopes=[0.5], logits_soft_cap=30.0, sinks=torch.zeros(9), kv_cache_dtype="fp8")
    message = str(refused.value)
    for part in ("kv_cache_dtype 'fp8'", "ALiBi slopes", "logits soft-capping", "attention sinks",
                 "--kv-cache-dtype auto or fp8"):
        assert part in message, message


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_kv_sharing_layers_are_refused(kind):
    """Gemma 3n / 4 layers that read another layer's cache (before: accepted, silently wrong logits)."""
    with pytest.raises(ValueError, match="KV-cache sharing \\(this layer reads 'model.layers.3.attn'"):
        _layer(kind, kv_sharing_target_layer_name="model.layers.3.attn")


@pytest.mark.parametrize(
    "impl",
    [
        "vllm_nf4kv.backends.cpu_attn.NF4CPUAttentionImpl",
        "vllm_nf4kv.backends.triton_attn.NF4TritonAttentionImpl",
    ],
)
def test_the_impls_pass_kv_sharing_to_the_refusal(impl):
    from vllm.utils.import_utils import resolve_obj_by_qualname

    cls = resolve_obj_by_qualname(impl)
    with pytest.raises(ValueError, match="KV-cache sharing"):
        cls(4, 64, 0.125, 2, None, None, "nf4", kv_sharing_target_layer_name="model.layers.3.attn")
