"""Triton kernels for the NF4 paged KV cache.

Nothing here imports Triton at package import time: ``import vllm_nf4kv.kernels``
is safe on machines without Triton, and ``TRITON_INTERPRET`` is read by
``@triton.jit`` only when a kernel module is first imported.

Modules (each a ``_kernel`` beside its typed launcher, checks before launch):

* :mod:`~vllm_nf4kv.kernels.triton_codec`: ``@triton.jit`` helpers shared by the
  kernels (ue5m3 and two-level scale decode, NF4 tile dequantization, bf16 rounding)
  and the per-device NF4 and ladder tables they read.
* :mod:`~vllm_nf4kv.kernels.triton_store`: ``store_kv_nf4`` (quantize-on-write,
  bit-exact with :func:`vllm_nf4kv.reference.quantize_rows`) and ``load_kv_nf4``
  (paged cache -> rotated K/V, equal to :func:`vllm_nf4kv.reference.read_paged`).
* :mod:`~vllm_nf4kv.kernels.triton_attention`: ``nf4_paged_attention``, fused
  paged attention reading NF4 pages directly (decode, prefill, chunked prefill).
* :mod:`~vllm_nf4kv.kernels.compile_check`: compiles every kernel for a CUDA
  target on a machine without a GPU (used by the tests).

Everything runs in the *rotated* space: callers prepare K/V with
:func:`vllm_nf4kv.reference.prepare_rows` (sanitize, rotate) before ``store_kv_nf4``,
rotate queries before ``nf4_paged_attention`` with :func:`vllm_nf4kv.rotation.rotate`,
and un-rotate the attention output with :func:`vllm_nf4kv.rotation.unrotate`. Every
constant comes from :mod:`vllm_nf4kv.format` as a constexpr; the kernels are tested
against :mod:`vllm_nf4kv.reference` and :mod:`vllm_nf4kv.reference_attention`.
"""
