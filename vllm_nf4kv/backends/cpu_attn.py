"""NF4 attention backend for vLLM's CPU platform.

It reuses vLLM's CPU backend for everything that is not about the cache
format (metadata fields, block sizes, head sizes) and replaces the two places
that touch pages: ``do_kv_cache_update`` quantizes K/V into NF4 cells, and
``forward`` attends over the NF4 pages, the current chunk included, so a
prefix-cache hit reads exactly what a cold run wrote.

Both run the C++ kernels of :mod:`vllm_nf4kv.cpu_kernels` (built on first
use); where they cannot be built, the PyTorch reference path
(:func:`vllm_nf4kv.reference.write_paged`, :mod:`vllm_nf4kv.paged_attention`),
which writes the same bytes and is several times slower.
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_nf4kv import calibration, cpu_kernels
from vllm_nf4kv.backends.common import NF4BackendMixin, holds_head_size
from vllm_nf4kv.backends.selection import check_layer
from vllm_nf4kv.backends.smoothing import layer_smoothing
from vllm_nf4kv.kernel_limits import CPU_LIMITS
from vllm_nf4kv.paged_attention import ACCUMULATE, paged_attention
from vllm_nf4kv.reference import write_paged
from vllm_nf4kv.rotation import rotate, unrotate

logger = init_logger("vllm.nf4kv")


class NF4CPUAttentionBackend(NF4BackendMixin, CPUAttentionBackend):
    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [h for h in super().get_supported_head_sizes() if holds_head_size(h, CPU_LIMITS.max_head_dim)]

    @staticmethod
    def get_impl_cls() -> type[NF4CPUAttentionImpl]:
        return NF4CPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[NF4CPUMetadataBuilder]:
        return NF4CPUMetadataBuilder


class NF4CPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU metadata without the C++ scheduler plan (our forward does not use it)."""

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> CPUAttentionMetadata:
        m = common_attn_metadata
        return CPUAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens,
            max_query_len=m.max_query_len,
            query_start_loc=m.query_start_loc,
            max_seq_len=m.max_seq_len,
            seq_lens=m.seq_lens,
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping,
            scheduler_metadata=None,
            causal=bool(m.causal),
        )


class NF4CPUAttentionImpl(CPUAttentionBackendImpl):
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
    ) -> None:
        self.layout = check_layer(
            "cpu", kv_cache_dtype=kv_cache_dtype, attn_type=attn_type, num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_size=head_size, sliding_window=sliding_window,
            alibi_slopes=alibi_slopes, logits_soft_cap=logits_soft_cap, sinks=sinks,
            kv_sharing_target_layer_name=kv_sharing_target_layer_name,
        )
        super().__init__(
            num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
            kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks,
        )
        self.use_kernels = cpu_kernels.available()
        self.smoothing = layer_smoothing(num_heads, num_kv_heads, head_size)
        logger.info_once("nf4 KV cache on CPU: %s", cpu_kernels.describe())

    @staticmethod
    def _cache(kv_cache: torch.Tensor) -> torch.Tensor:
        """The pages as uint8 (every path below checks their shape against the layout)."""
        return kv_cache.view(torch.uint8) if kv_cache.dtype != torch.uint8 else kv_cache

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes]
        slot_mapping: torch.Tensor,  # [num_tokens]
    ) -> None:
        cache = self._cache(kv_cache)
        n = slot_mapping.shape[0]
        key, value = key[:n], value[:n]
        transform = self.smoothing.for_layer(layer)
        if transform is not None:  # (k - c) * d and v - mu; forward reads with q / d, adds mu (calibration)
            key, value = transform.keys(key), transform.values(value)
        if not self.use_kernels:
            write_paged(cache, key, value, slot_mapping, self.layout)
            return
        cpu_kernels.store(cache, key, value, slot_mapping, self.layout)

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, cell_bytes]
        attn_metadata: CPUAttentionMetadata | None,
        output: torch.Tensor,  # [num_tokens, num_heads * head_size]
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported with nf4")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        n = attn_metadata.num_actual_tokens
        query = query.view(-1, self.num_heads, self.head_size)[:n]
        if calibration.ACTIVE_CAPTURE:  # vllm-nf4kv calibrate is measuring
            shape = (-1, self.num_kv_heads, self.head_size)
            calibration.observe(layer, query, key.view(shape)[:n], value.view(shape)[:n])
        transform = self.smoothing.for_layer(layer)
        if transform is not None:
            query = transform.queries(query)
        cache = self._cache(kv_cache)
        metadata = (attn_metadata.query_start_loc, attn_metadata.seq_lens, attn_metadata.block_table)
        window = self.sliding_window if self.sliding_window > 0 else None
        if self.use_kernels:  # rotation in and out happens inside the kernel
            result = cpu_kernels.attention(
                query, cache, self.layout, *metadata, self.scale, attn_metadata.causal, window
            )
        else:
            rotated = paged_attention(
                rotate(query, ACCUMULATE), cache, self.layout, *metadata, self.scale,
                attn_metadata.causal, window,
            )
            result = unrotate(rotated, torch.float32 if transform is not None else output.dtype)
        if transform is not None:
            result = transform.outputs(result)
        output.view(-1, self.num_heads, self.head_size)[:n] = result
        return output
