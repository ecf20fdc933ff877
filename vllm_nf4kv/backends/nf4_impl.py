"""What an NF4 attention impl does around its kernels, written once for the CPU and CUDA backends.

vLLM hands both impls the same calls; everything that is not a kernel call is the same on both
platforms: refuse the layer before any page exists (``selection.check_layer``), find the
layer's key smoothing, let ``vllm-nf4kv calibrate`` see the step's queries, keys and values,
refuse fused output quantization, skip the profiling run. Each backend supplies only
:meth:`NF4ImplBase.init_platform`, :meth:`~NF4ImplBase.store` and :meth:`~NF4ImplBase.attend`.

Everything here is views and Python: the CUDA impl's hot path must issue no tensor arithmetic
(``tests/test_cuda_backend_interpreted.py`` records it), and CUDA-graph capture replays it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import AttentionType

from vllm_nf4kv import calibration_measure
from vllm_nf4kv.backends.selection import check_layer
from vllm_nf4kv.backends.smoothing import layer_smoothing
from vllm_nf4kv.kv_transform import KVTransform


class NF4ImplBase(ABC):
    """Put first in the bases of an NF4 impl: its ``__init__``, ``do_kv_cache_update`` and ``forward`` win."""

    PLATFORM: ClassVar[str]  # "cpu" or "cuda": the kernel limits check_layer holds the layer to

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **unused: object,
    ) -> None:
        # first: a layer the kernels cannot serve gets its reason before the base impl's checks
        self.layout = check_layer(
            self.PLATFORM, kv_cache_dtype=kv_cache_dtype, attn_type=attn_type, num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_size=head_size, sliding_window=sliding_window,
            alibi_slopes=alibi_slopes, logits_soft_cap=logits_soft_cap, sinks=sinks,
            kv_sharing_target_layer_name=kv_sharing_target_layer_name,
        )
        # the attributes vLLM and this class read (a base impl's __init__ may set them again)
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads, self.kv_cache_dtype, self.attn_type = num_kv_heads, kv_cache_dtype, attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.init_platform(
            num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
            logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks,
        )
        self.smoothing = layer_smoothing(num_heads, num_kv_heads, head_size)

    @abstractmethod
    def init_platform(self, *args: Any) -> None:
        """The base impl's ``__init__`` where it has one (``args``: vLLM's, in its order), then the
        kernels' own set-up; ``self.layout`` and the attributes above are set."""

    @abstractmethod
    def store(
        self, cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
        transform: KVTransform | None,
    ) -> None:
        """Quantize K/V [tokens, kv_heads, head_size] into the uint8 pages at ``slot_mapping``,
        applying the layer's smoothing (``transform``: ``(k - c) * d`` and ``v - mu``) first."""

    @abstractmethod
    def attend(
        self, query: torch.Tensor, cache: torch.Tensor, attn_metadata: Any, transform: KVTransform | None,
        output: torch.Tensor,
    ) -> None:
        """Attention of ``query`` [n, heads, head_size] over the uint8 pages into ``output`` (same
        shape), undoing the smoothing (``q / d`` in, ``+ mu`` out)."""

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes]
        slot_mapping: torch.Tensor,  # [num_tokens]
    ) -> None:
        self.store(kv_cache.view(torch.uint8), key, value, slot_mapping, self.smoothing.for_layer(layer))

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes]
        attn_metadata: Any,
        output: torch.Tensor,  # [num_tokens, num_heads * head_size]
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported with nf4")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        n = attn_metadata.num_actual_tokens
        query = query[:n].view(n, self.num_heads, self.head_size)
        if calibration_measure.ACTIVE_CAPTURE:  # vllm-nf4kv calibrate is measuring
            shape = (n, self.num_kv_heads, self.head_size)
            calibration_measure.observe(layer, query, key[:n].view(shape), value[:n].view(shape))
        self.attend(
            query, kv_cache.view(torch.uint8), attn_metadata, self.smoothing.for_layer(layer),
            output.view(-1, self.num_heads, self.head_size)[:n],
        )
        return output
