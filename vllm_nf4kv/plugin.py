"""The ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in every process it starts (API server, engine
core, workers), before it validates the engine configuration, and does not
catch what it raises. So :func:`register` is idempotent and cheap, changes
nothing for kv-cache dtypes other than nf4, and on a vLLM it does not support
logs why nf4 is unavailable instead of breaking every other use of vLLM.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.nf4kv")  # under "vllm": vLLM configures its handlers

_REGISTERED = False


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    from vllm_nf4kv import patches
    from vllm_nf4kv.registration import UnsupportedVLLMError, register_nf4_kv_cache_dtype

    try:
        register_nf4_kv_cache_dtype()
    except UnsupportedVLLMError as error:
        logger.error("%s", error)
    patches.install_block_pool_ttl()
