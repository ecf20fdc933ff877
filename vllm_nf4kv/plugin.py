"""The ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in every process it starts (API server, engine
core, workers), before it validates the engine configuration, and does not
catch what it raises: an exception here would break vLLM for every model and
dtype. So :func:`register` never raises. It installs three independent
features, each completely or not at all: a feature that fails (an unsupported
vLLM, an import error, anything) is undone through the patch journal
(:func:`vllm_nf4kv.journal.undo_to`) and logged as one error naming it and the
cause, and vLLM runs as if it were not there. :func:`register` is idempotent,
and with no nf4 cache and no TTL configured, vLLM's own classes and stats path
stay in place (docs/reliability.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from vllm_nf4kv import journal
from vllm_nf4kv.self_check import NF4_FEATURE, TTL_FEATURE  # imports no vLLM

logger = logging.getLogger("vllm.nf4kv")  # under "vllm": vLLM configures its handlers

_REGISTERED = False


def _install(feature: str, step: Callable[[], None]) -> bool:
    """Run one feature's installation; on any failure undo it, log one error, return False."""
    mark = journal.mark()
    try:
        step()
    except Exception as error:  # noqa: BLE001 (nothing may escape into vLLM)
        state = "vLLM is unchanged by it"
        try:
            journal.undo_to(mark)
        except Exception as undo_error:  # noqa: BLE001
            state = f"undoing it failed too ({type(undo_error).__name__}: {undo_error})"
        cause = f"{type(error).__name__}: {error}"
        logger.error("vllm-nf4kv: %s is unavailable (%s); %s", feature, cause, state)
        return False
    return True


def _settings_validation() -> None:
    from vllm_nf4kv import patches

    patches.validate_engine_config()
    patches.validate_request_args()


def _nf4_cache_dtype() -> None:
    from vllm_nf4kv.registration import register_nf4_kv_cache_dtype

    register_nf4_kv_cache_dtype()


def _prefix_cache_ttl() -> None:
    from vllm_nf4kv import self_check
    from vllm_nf4kv.ttl import patches as ttl_patches

    self_check.run_self_check(TTL_FEATURE, self_check.check_ttl_pool)  # before anything is changed
    ttl_patches.install_ttl()


FEATURES: tuple[tuple[str, Callable[[], None]], ...] = (
    ("startup validation of the nf4kv settings", _settings_validation),
    (NF4_FEATURE, _nf4_cache_dtype),
    (TTL_FEATURE, _prefix_cache_ttl),
)


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    for feature, step in FEATURES:
        _install(feature, step)
