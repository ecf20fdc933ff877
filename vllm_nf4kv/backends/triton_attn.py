"""NF4 attention backend for vLLM on CUDA (0.33, 0.34), built on the fused Triton kernels.

Writes go through ``store_kv_nf4`` (smoothing, rotation and quantization by ``slot_mapping``
in one kernel), reads through ``nf4_paged_attention``, which rotates the queries in its
prologue, unpacks codes and scales in registers and rotates the outputs back in its epilogue:
no bf16 copy of the cache exists at any point, and nothing but views runs between vLLM and
the two kernels (what the impl does around them: :mod:`vllm_nf4kv.backends.nf4_impl`).

CUDA graphs: ``ALWAYS``. Grids, constexprs and the split-K workspace depend on shapes and the
host-known ``max_query_len`` only, every table is on the device before the first forward, and
a query's bits do not depend on its batch (docs/reliability.md, "Batch invariance on CUDA").
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionImpl, MultipleOf
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import KVCacheLayout

from vllm_nf4kv.backends.common import NF4BackendMixin, engine_max_model_len, holds_head_size
from vllm_nf4kv.backends.nf4_impl import NF4ImplBase
from vllm_nf4kv.kernel_limits import CUDA_LIMITS
from vllm_nf4kv.kernels.triton_attention import chunk_plan, nf4_paged_attention
from vllm_nf4kv.kernels.triton_codec import ladder_table, nf4_tables
from vllm_nf4kv.kernels.triton_rotation import rotation_table
from vllm_nf4kv.kernels.triton_store import store_kv_nf4
from vllm_nf4kv.kv_transform import KVTransform


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


class NF4TritonAttentionImpl(NF4ImplBase, AttentionImpl):
    PLATFORM = "cuda"

    def init_platform(self, *args: Any) -> None:
        self.sliding_window = None  # AttentionImpl's __init__ is abstract: nothing else to set
        # a model-level constant of the attention arithmetic (batch invariance): never per batch
        self.chunk_tokens, self.max_chunks = chunk_plan(engine_max_model_len())
        # every table the kernels read on the device now (each is built once per device and
        # cached), so no forward allocates or computes one, warm-up and CUDA-graph capture included
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        rotation_table(self.head_size, device)
        nf4_tables(device)
        ladder_table(self.layout.key, device), ladder_table(self.layout.value, device)

    def store(
        self, cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
        transform: KVTransform | None,
    ) -> None:
        tables = {} if transform is None else transform.store_tables(cache.device)
        store_kv_nf4(cache, key, value, slot_mapping, self.layout, **tables)

    def attend(
        self, query: torch.Tensor, cache: torch.Tensor, attn_metadata: TritonAttentionMetadata,
        transform: KVTransform | None, output: torch.Tensor,
    ) -> None:
        tables = {} if transform is None else transform.attention_tables(cache.device)
        nf4_paged_attention(
            query,
            cache,
            attn_metadata.block_table,
            attn_metadata.query_start_loc,
            attn_metadata.seq_lens,
            self.layout,
            self.scale,
            max_query_len=attn_metadata.max_query_len,
            chunk_tokens=self.chunk_tokens,
            max_chunks=self.max_chunks,
            output=output,
            **tables,
        )
