"""vLLM attention backends that store and read the NF4 cache format.

``cpu_attn`` runs on vLLM's CPU platform (pure PyTorch, the reference path);
``triton_attn`` runs on CUDA with fused Triton kernels. Both use the one
layout of :mod:`vllm_nf4kv.format`. Importing this package imports no vLLM.
"""
