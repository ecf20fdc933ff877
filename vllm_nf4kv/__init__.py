"""vllm-nf4kv: an NF4 paged KV cache for vLLM, loaded as a general plugin.

Importing this package imports neither vLLM nor Triton; the plugin entry point
is :func:`vllm_nf4kv.plugin.register`.
"""

__version__ = "0.1.0"
