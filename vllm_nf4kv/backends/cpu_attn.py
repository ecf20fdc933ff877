"""NF4 attention backend for vLLM's CPU platform.

It reuses vLLM's CPU backend for everything that is not about the cache
format (metadata fields, block sizes, head sizes) and replaces the two places
that touch pages: ``do_kv_cache_update`` quantizes K/V into NF4 cells, and
``forward`` attends over the NF4 pages, the current chunk included, so a
prefix-cache hit reads exactly what a cold run wrote.

Both run the C++ kernels of :mod:`vllm_nf4kv.cpu_kernels` (built on first
use), bound to the layer's layout once, the calibration applied inside them as the Triton
kernels do; where they cannot be built, the PyTorch reference path
(:func:`vllm_nf4kv.reference.write_paged`, :mod:`vllm_nf4kv.paged_attention`),
which writes the same bytes and is several times slower.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.logger import init_logger
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_nf4kv import cpu_kernels
from vllm_nf4kv.backends.common import NF4BackendMixin, holds_head_size
from vllm_nf4kv.backends.nf4_impl import NF4ImplBase
from vllm_nf4kv.kernel_limits import CPU_LIMITS
from vllm_nf4kv.kv_transform import KVTransform
from vllm_nf4kv.paged_attention import ATTENTION_DTYPE, paged_attention
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


class NF4CPUAttentionImpl(NF4ImplBase, CPUAttentionBackendImpl):
    PLATFORM = "cpu"

    def init_platform(self, *args: Any) -> None:
        CPUAttentionBackendImpl.__init__(self, *args)
        self.kernels = cpu_kernels.LayoutKernels(self.layout) if cpu_kernels.available() else None
        logger.info_once("nf4 KV cache on CPU: %s", cpu_kernels.describe())

    def store(
        self, cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
        transform: KVTransform | None,
    ) -> None:
        if self.kernels is not None:  # the op stores min(tokens, slots) tokens
            tables = transform.store_tables(cache.device) if transform is not None else {}
            self.kernels.store(cache, key, value, slot_mapping, **tables)
            return
        n = slot_mapping.shape[0]
        key, value = key[:n], value[:n]
        if transform is not None:
            key, value = transform.keys(key), transform.values(value)
        write_paged(cache, key, value, slot_mapping, self.layout)

    def attend(
        self, query: torch.Tensor, cache: torch.Tensor, attn_metadata: CPUAttentionMetadata,
        transform: KVTransform | None, output: torch.Tensor,
    ) -> None:
        metadata = (attn_metadata.query_start_loc, attn_metadata.seq_lens, attn_metadata.block_table)
        window = self.sliding_window if self.sliding_window > 0 else None
        if self.kernels is not None:  # rotation in and out, calibration, output dtype: inside the op
            tables = transform.attention_tables(cache.device) if transform is not None else {}
            self.kernels.attention(
                query, cache, *metadata, self.scale, attn_metadata.causal, window, out=output, **tables
            )
            return
        if transform is not None:
            query = transform.queries(query)
        rotated = paged_attention(
            rotate(query, ATTENTION_DTYPE), cache, self.layout, *metadata, self.scale,
            attn_metadata.causal, window,
        )
        result = unrotate(rotated, torch.float32 if transform is not None else output.dtype)
        if transform is not None:
            result = transform.outputs(result)
        output[:] = result
