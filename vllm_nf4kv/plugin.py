"""The ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in every process it starts (API server, engine
core, workers), before it validates the engine configuration. It must be
idempotent and cheap, and change nothing for kv-cache dtypes other than nf4.
"""

from __future__ import annotations

_REGISTERED = False


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm_nf4kv import patches

    patches.install_block_pool_ttl()
    _REGISTERED = True
