"""Command-line tools behind ``vllm-nf4kv`` (see :mod:`vllm_nf4kv.cli`)."""
