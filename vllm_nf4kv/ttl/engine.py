"""Glue between vLLM's engine objects and the TTL policy (called from ``patches``).

* :func:`check_config`: resolve and validate the TTL from a ``VllmConfig``
  (a clear ``ValueError`` at startup, before any model is loaded);
* :func:`install_on_scheduler`: put the policy on the scheduler's block pool,
  the only pool it is meant for (the scheduler is the one engine object that
  receives ``vllm_config``; CPU-offload and HiSparse pools are left as vLLM's);
* :func:`attach_stats`: add the metrics payload to the scheduler's stats.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_nf4kv.ttl.config import TTLSetting, resolve_ttl
from vllm_nf4kv.ttl.metrics import (
    P_CACHED,
    P_EXPIRED,
    P_KV_BF16_BYTES,
    P_KV_BYTES,
    P_TTL_MS,
    kv_memory,
    ttl_to_ms,
)
from vllm_nf4kv.ttl.pool import enable_ttl, missing_features, ttl_state

logger = logging.getLogger("vllm.nf4kv.ttl")

STATS_SWEEP_BUDGET = 4096  # expired blocks handled before each stats report, at most
SCHEDULER_HOOKED = False  # set by vllm_nf4kv.patches once Scheduler.__init__ applies the TTL


def check_config(vllm_config: Any) -> TTLSetting:
    """The engine's TTL; raises ValueError for a bad value or a scheduler it cannot reach."""
    setting = resolve_ttl(getattr(vllm_config, "additional_config", None))
    if not setting.enabled:
        return setting
    if not SCHEDULER_HOOKED:
        raise ValueError(
            f"{setting.source}: a prefix-cache TTL is set, but vllm-nf4kv could not hook this "
            f"vLLM's scheduler (see the warnings above); unset the TTL or use vLLM 0.32/0.33"
        )
    scheduler_config = getattr(vllm_config, "scheduler_config", None)
    get_cls = getattr(scheduler_config, "get_scheduler_cls", None)
    if callable(get_cls):
        from vllm.v1.core.sched.scheduler import Scheduler

        scheduler_cls = get_cls()
        if isinstance(scheduler_cls, type) and not issubclass(scheduler_cls, Scheduler):
            raise ValueError(
                f"{setting.source}: the prefix-cache TTL works on vLLM's Scheduler and its "
                f"subclasses, but --scheduler-cls is {scheduler_cls.__qualname__}; unset the TTL "
                f"or use a scheduler derived from vllm.v1.core.sched.scheduler.Scheduler"
            )
    return setting


def install_on_scheduler(scheduler: Any) -> None:
    """Enable the policy (or, with the TTL off, only its counting) on the scheduler's pool."""
    setting = check_config(scheduler.vllm_config)
    manager = getattr(scheduler, "kv_cache_manager", None)
    pool = getattr(manager, "block_pool", None)
    missing = ["Scheduler.kv_cache_manager.block_pool"] if pool is None else missing_features(pool)
    if missing:
        if setting.enabled:
            raise RuntimeError(
                f"{setting.source}: the prefix-cache TTL cannot run on this vLLM "
                f"(missing: {', '.join(missing)}); unset the TTL or use vLLM 0.32/0.33"
            )
        logger.debug("vllm-nf4kv: prefix-cache metrics off (missing: %s)", ", ".join(missing))
        return
    ttl_s = setting.ttl_s
    if ttl_s is not None and not pool.enable_caching:
        logger.warning(
            "vllm-nf4kv: %s sets a prefix-cache TTL of %s s, but prefix caching is "
            "disabled: the TTL has no effect",
            setting.source,
            ttl_s,
        )
        ttl_s = None
    state = enable_ttl(pool, ttl_s)
    try:
        memory = kv_memory(scheduler.kv_cache_config)
    except Exception:  # metrics only: never fail startup over them
        logger.debug("vllm-nf4kv: KV memory figures unavailable", exc_info=True)
        memory = (0, 0)
    scheduler._nf4kv_report = {"memory": memory, "expired_reported": 0}
    if state.ttl_s is not None:
        logger.info(
            "vllm-nf4kv: prefix-cache TTL %s s (from %s) on the scheduler's block pool (%d blocks)",
            state.ttl_s,
            setting.source,
            len(pool.blocks),
        )


def attach_stats(scheduler: Any, stats: Any) -> None:
    """Add the payload (``metrics.P_*`` keys) to ``stats.num_kv_fetch_reqs_by_stage``."""
    report = getattr(scheduler, "_nf4kv_report", None)
    pool = getattr(getattr(scheduler, "kv_cache_manager", None), "block_pool", None)
    state = ttl_state(pool)
    if report is None or state is None or stats is None:
        return
    if state.ttl_s is not None:
        pool.nf4kv_sweep(STATS_SWEEP_BUDGET)
    kv_bytes, kv_bf16_bytes = report["memory"]
    stats.num_kv_fetch_reqs_by_stage.update(
        {
            P_EXPIRED: state.expired_blocks - report["expired_reported"],
            P_CACHED: state.cached_blocks,
            P_TTL_MS: ttl_to_ms(state.ttl_s),
            P_KV_BYTES: kv_bytes,
            P_KV_BF16_BYTES: kv_bf16_bytes,
        }
    )
    report["expired_reported"] = state.expired_blocks
