"""Triton kernels for the NF4 paged KV cache.

Nothing here imports Triton at package import time: ``import vllm_nf4kv.kernels``
is safe on machines without Triton, and ``TRITON_INTERPRET`` is read by
``@triton.jit`` only when a kernel module is first imported.

Modules (each launcher checks its inputs before any launch):

* :mod:`~vllm_nf4kv.kernels.triton_codec`: ``@triton.jit`` helpers shared by the
  kernels (ue5m3 and two-level scale decode, NF4 tile dequantization, bf16 rounding)
  and the per-device NF4 and ladder tables they read.
* :mod:`~vllm_nf4kv.kernels.triton_rotation`: the Hadamard rotation as fp64 butterflies
  inside the kernels (``reference.rotate``'s operations) and its per-device table.
* :mod:`~vllm_nf4kv.kernels.triton_quantize`: the store's row encoder (``@triton.jit``):
  one rotated row to NF4 codes and scale codes, ``reference.quantize_groups`` /
  ``quantize_two_level`` operation for operation.
* :mod:`~vllm_nf4kv.kernels.triton_store`: ``store_kv_nf4`` (calibrate, sanitize, rotate
  and quantize model-space K/V on write, bit-exact with :func:`vllm_nf4kv.reference.write_paged`).
* :mod:`~vllm_nf4kv.kernels.triton_attention`: ``nf4_paged_attention``, fused
  paged attention reading NF4 pages directly (decode, prefill, chunked prefill), queries
  in and outputs out in model space, batch-invariant by construction; host side (checks,
  launch heuristics, ``chunk_plan``, ``should_split``), the module to import.
* :mod:`~vllm_nf4kv.kernels.triton_attention_kernels`: its ``@triton.jit`` kernels (attention
  and split-K merge) and the design notes that make a query's bits independent of its batch.

Test and developer tools live outside the package: ``tests/triton_load.py`` (``load_kv_nf4``,
the cache read back into rotated K/V, which no serving path needs) and
``tests/compile_check.py`` (compiles every kernel for a CUDA target on a machine without a GPU).

The kernels take what vLLM hands the backend (model-space K, V and queries) plus the
layer's calibration tables, and rotate inside. Every constant comes from
:mod:`vllm_nf4kv.format` as a constexpr (the rotation's from :mod:`vllm_nf4kv.rotation` as a
table); the kernels are tested against :mod:`vllm_nf4kv.reference` and
:mod:`vllm_nf4kv.reference_attention`.
"""
