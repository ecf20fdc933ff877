"""NF4 attention backend for vLLM on CUDA (0.33, 0.34), built on the fused Triton kernels.

Writes go through ``store_kv_nf4`` (quantize-on-write by ``slot_mapping``), reads
through ``nf4_paged_attention``, which unpacks codes and scales in registers:
no bf16 copy of the cache exists at any point. Queries are rotated before the
kernel and outputs rotated back after it, the two small matmuls that fold the
Hadamard rotation into attention.

CUDA graphs: declared ``NEVER`` for now. The kernels take a fixed split count
and could be captured, but this path has not yet been run under full-graph
capture on a GPU; with ``NEVER`` vLLM keeps piecewise graphs for everything
but attention, which is safe.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionImpl, AttentionType, MultipleOf
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import KVCacheLayout

from vllm_nf4kv import calibration
from vllm_nf4kv.backends.common import NF4BackendMixin, engine_max_model_len, holds_head_size
from vllm_nf4kv.backends.selection import check_layer
from vllm_nf4kv.backends.smoothing import layer_smoothing
from vllm_nf4kv.kernel_limits import CUDA_LIMITS
from vllm_nf4kv.kernels.triton_attention import chunk_plan, nf4_paged_attention
from vllm_nf4kv.kernels.triton_codec import ladder_table, nf4_tables
from vllm_nf4kv.kernels.triton_rotation import rotation_table
from vllm_nf4kv.kernels.triton_store import store_kv_nf4


class NF4TritonMetadataBuilder(TritonAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.ALWAYS


class NF4TritonAttentionBackend(NF4BackendMixin, TritonAttentionBackend):
    forward_includes_kv_cache_update: bool = False

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Per-KV-head pages: a tensor-parallel rank owns its heads' pages only.
        return (KVCacheLayout.LBHNC,)

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:  # noqa: ANN001
        return [MultipleOf(16)]

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return holds_head_size(head_size, CUDA_LIMITS.max_head_dim)

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return CUDA_LIMITS.sliding_window

    @staticmethod
    def get_impl_cls() -> type[NF4TritonAttentionImpl]:
        return NF4TritonAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[NF4TritonMetadataBuilder]:
        return NF4TritonMetadataBuilder


class NF4TritonAttentionImpl(AttentionImpl):
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
        self.layout = check_layer(
            "cuda", kv_cache_dtype=kv_cache_dtype, attn_type=attn_type, num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_size=head_size, sliding_window=sliding_window,
            alibi_slopes=alibi_slopes, logits_soft_cap=logits_soft_cap, sinks=sinks,
            kv_sharing_target_layer_name=kv_sharing_target_layer_name,
        )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.sliding_window = None
        self.smoothing = layer_smoothing(num_heads, num_kv_heads, head_size)
        # a model-level constant of the attention arithmetic (batch invariance): never per batch
        self.chunk_tokens, self.max_chunks = chunk_plan(engine_max_model_len())
        # every table the kernels read on the device now (each is built once per device and
        # cached), so no forward allocates or computes one, warm-up and CUDA-graph capture included
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        rotation_table(head_size, device)
        nf4_tables(device)
        ladder_table(self.layout.key, device), ladder_table(self.layout.value, device)

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes]
        slot_mapping: torch.Tensor,  # [num_tokens]
    ) -> None:
        transform = self.smoothing.for_layer(layer)
        tables = {}
        if transform is not None:  # (k - c) * d and v - mu in the kernel; forward reads with q / d, adds mu
            tables = transform.store_tables(kv_cache.device)
        store_kv_nf4(kv_cache.view(torch.uint8), key, value, slot_mapping, self.layout, **tables)

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes]
        attn_metadata: TritonAttentionMetadata | None,
        output: torch.Tensor,  # [num_tokens, num_heads * head_size]
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported with nf4")
        if attn_metadata is None:  # profiling run
            return output
        n = attn_metadata.num_actual_tokens
        query = query[:n].view(n, self.num_heads, self.head_size)
        if calibration.ACTIVE_CAPTURE:  # vllm-nf4kv calibrate is measuring
            shape = (n, self.num_kv_heads, self.head_size)
            calibration.observe(layer, query, key[:n].view(shape), value[:n].view(shape))
        transform = self.smoothing.for_layer(layer)
        tables = {} if transform is None else transform.attention_tables(kv_cache.device)
        nf4_paged_attention(
            query,
            kv_cache.view(torch.uint8),
            attn_metadata.block_table,
            attn_metadata.query_start_loc,
            attn_metadata.seq_lens,
            self.layout,
            self.scale,
            max_query_len=attn_metadata.max_query_len,
            chunk_tokens=self.chunk_tokens,
            max_chunks=self.max_chunks,
            output=output.view(-1, self.num_heads, self.head_size)[:n],
            **tables,
        )
        return output
