"""Glue between vLLM's engine objects and the TTL policy (called from ``ttl.patches``).

* :func:`check_config`: resolve and validate the TTL from a ``VllmConfig``
  (a clear ``ValueError`` at startup, before any model is loaded);
* :func:`install_on_scheduler`: put the policy on the scheduler's block pool,
  the only pool it is meant for (the scheduler is the one engine object that
  receives ``vllm_config``; CPU-offload and HiSparse pools are left as vLLM's),
  and only when a server TTL is set;
* :func:`on_add_request`: the first request that sets its own TTL turns request
  TTLs on for this engine (until then nothing runs per allocation);
* :func:`attach_stats`: add the metrics payload to the scheduler's stats.

With no TTL set and no request that sets one, the scheduler keeps vLLM's own
``BlockPool`` and ``KVCacheManager`` classes and its own ``make_stats``; an
nf4 engine only adds its memory gauges to the stats (:func:`wrap_make_stats`).

Request TTLs reach the pool through the scheduler's KV-cache manager: its
instance gets a subclass of its own class (:func:`ttl_manager_class`) whose
``allocate_slots`` opens :func:`~vllm_nf4kv.ttl.pool.request_ttl_scope` with the
request's TTL, so the blocks that allocation hits or takes carry it.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from vllm_nf4kv.format import KV_CACHE_DTYPE
from vllm_nf4kv.journal import SUPPORTED_VLLM
from vllm_nf4kv.ttl.config import (
    CONFIG_NAMESPACE,
    MAX_REQUEST_KEY,
    REQUEST_KEY,
    TTLSetting,
    parse_request_ttl,
    resolve_ttl,
)
from vllm_nf4kv.ttl.expiry import TTLState
from vllm_nf4kv.ttl.metrics import (
    PAYLOAD_CACHED,
    PAYLOAD_EXPIRED,
    PAYLOAD_EXPIRED_REQUEST,
    PAYLOAD_KV_BF16_BYTES,
    PAYLOAD_KV_BYTES,
    PAYLOAD_TTL_MS,
    kv_memory,
    ttl_to_ms,
)
from vllm_nf4kv.ttl.pool import enable_ttl, missing_features, request_ttl_scope, ttl_state

logger = logging.getLogger("vllm.nf4kv.ttl")

STATS_SWEEP_BUDGET = 4096  # expired blocks handled before each stats report, at most
# Set by vllm_nf4kv.ttl.patches.install_ttl: which of its patches are in place on this vLLM.
SCHEDULER_HOOKED = False  # Scheduler.__init__ applies the TTL
REQUESTS_HOOKED = False  # request TTLs are applied (Scheduler.add_request)
STATS_HOOKED = False  # the front end takes the nf4kv: payload out of SchedulerStats


def unavailable(what: str, remedy: str) -> str:
    """Why ``what`` cannot apply on this vLLM: the TTL self-check's failure, or a missing hook."""
    from vllm_nf4kv.self_check import TTL_FEATURE, failure

    why = failure(TTL_FEATURE) or "vllm-nf4kv could not hook this vLLM's scheduler (see the log above)"
    return f"{what}, but the prefix-cache TTL is unavailable: {why}; {remedy} (supported: {SUPPORTED_VLLM})"


def check_config(vllm_config: Any) -> TTLSetting:
    """The engine's TTL; raises ValueError for a bad value or a scheduler it cannot reach."""
    setting = resolve_ttl(getattr(vllm_config, "additional_config", None))
    if setting.max_request_ttl_s is not None and not REQUESTS_HOOKED:
        what = f"--additional-config {CONFIG_NAMESPACE}.{MAX_REQUEST_KEY} is set"
        raise ValueError(unavailable(what, "unset it"))
    if not setting.enabled:
        return setting
    if not SCHEDULER_HOOKED:
        raise ValueError(unavailable(f"{setting.source}: a prefix-cache TTL is set", "unset the TTL"))
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
    """Apply a server TTL to the scheduler's pool; with none, leave vLLM's classes in place."""
    setting = check_config(scheduler.vllm_config)
    scheduler._nf4kv_setting = setting
    cache_config = getattr(scheduler.vllm_config, "cache_config", None)
    if getattr(cache_config, "cache_dtype", None) == KV_CACHE_DTYPE:
        _report_stats(scheduler)  # the memory gauges of an nf4 cache, with or without a TTL
    if not setting.enabled:
        return
    pool = getattr(scheduler.kv_cache_manager, "block_pool", None)
    missing = ["Scheduler.kv_cache_manager.block_pool"] if pool is None else missing_features(pool)
    if missing:
        raise RuntimeError(
            f"{setting.source}: a prefix-cache TTL is set, but the scheduler's block pool lacks "
            f"{', '.join(missing)}; unset the TTL (supported: {SUPPORTED_VLLM})"
        )
    if not pool.enable_caching:
        logger.warning(
            "vllm-nf4kv: %s sets a prefix-cache TTL of %s s, but prefix caching is "
            "disabled: the TTL has no effect",
            setting.source,
            setting.ttl_s,
        )
        return
    state = _activate(scheduler, pool)
    logger.info(
        "vllm-nf4kv: prefix-cache TTL %s s (from %s) on the scheduler's block pool (%d blocks)",
        state.ttl_s,
        setting.source,
        len(pool.blocks),
    )


def _report_stats(scheduler: Any) -> None:
    """Carry this scheduler's figures to ``/metrics`` (where the front end takes them out)."""
    if getattr(scheduler, "_nf4kv_report", None) is not None or not STATS_HOOKED:
        return
    try:
        memory = kv_memory(scheduler.kv_cache_config)
    except Exception:  # metrics only: never fail startup over them
        logger.debug("vllm-nf4kv: KV memory figures unavailable", exc_info=True)
        memory = (0, 0)
    scheduler._nf4kv_report = {"memory": memory, "expired_reported": (0, 0)}
    wrap_make_stats(scheduler)


def _activate(scheduler: Any, pool: Any) -> TTLState:
    """The policy on the scheduler's pool (server TTL and request TTLs), and its metrics."""
    setting: TTLSetting = scheduler._nf4kv_setting
    state = enable_ttl(pool, setting.ttl_s, request_ttls=True)
    manager = scheduler.kv_cache_manager
    manager.__class__ = ttl_manager_class(type(manager))
    _report_stats(scheduler)
    return state


def check_request_ttl(processor: Any, value: Any) -> None:
    """Raise ValueError unless a request's TTL can apply here (``patches.validate_request_args``).

    ``processor`` is vLLM's ``InputProcessor``; the server's maximum is resolved once per instance.
    """
    if not REQUESTS_HOOKED:
        raise ValueError(unavailable(f"the request sets {REQUEST_KEY}", f"send it without {REQUEST_KEY}"))
    setting = getattr(processor, "_nf4kv_ttl_setting", None)
    if setting is None:
        setting = processor._nf4kv_ttl_setting = resolve_ttl(processor.vllm_config.additional_config)
    parse_request_ttl(value, setting.max_request_ttl_s)


def request_ttl_of(request: Any) -> float | None:
    """The TTL a request set for itself (``SamplingParams.extra_args``), None for none.

    The API server refused bad values already (``patches.validate_request_args``);
    a value that still does not parse here (a request built around it) counts
    as 0, the privacy-safe reading, never as an error inside the engine.
    """
    extra_args = getattr(getattr(request, "sampling_params", None), "extra_args", None)
    if not extra_args:
        return None
    value = extra_args.get(REQUEST_KEY)
    if value is None:
        return None
    try:
        return parse_request_ttl(value)
    except ValueError as error:
        request_id = getattr(request, "request_id", "?")
        logger.warning("vllm-nf4kv: %s; request %s treated as TTL 0", error, request_id)
        return 0.0


class TTLScopedKVCacheManagerMixin:
    """``allocate_slots`` inside the request's TTL scope; everything else is vLLM's."""

    def allocate_slots(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        ttl_s = request_ttl_of(request)
        if ttl_s is None:
            return super().allocate_slots(request, *args, **kwargs)  # type: ignore[misc]
        with request_ttl_scope(self.block_pool, ttl_s):  # type: ignore[attr-defined]
            return super().allocate_slots(request, *args, **kwargs)  # type: ignore[misc]


_MANAGER_CLASSES: dict[type, type] = {}


def ttl_manager_class(base: type) -> type:
    """Our subclass of a ``KVCacheManager`` class (``base`` itself if it is ours)."""
    if issubclass(base, TTLScopedKVCacheManagerMixin):
        return base
    cls = _MANAGER_CLASSES.get(base)
    if cls is None:
        doc = f"{base.__qualname__} with request prefix-cache TTLs (vllm-nf4kv)."
        namespace = {"__module__": __name__, "__doc__": doc}
        cls = type(f"TTLScoped{base.__name__}", (TTLScopedKVCacheManagerMixin, base), namespace)
        _MANAGER_CLASSES[base] = cls
    return cls


def on_add_request(scheduler: Any, request: Any) -> None:
    """Turn request TTLs on for this engine at the first request that sets one."""
    if request_ttl_of(request) is None:
        return
    pool = getattr(getattr(scheduler, "kv_cache_manager", None), "block_pool", None)
    state = ttl_state(pool)
    if state is not None and state.request_ttls:
        return  # already on
    if pool is None or not pool.enable_caching or missing_features(pool):
        if not getattr(scheduler, "_nf4kv_request_ttls_unavailable", False):
            scheduler._nf4kv_request_ttls_unavailable = True
            caching_off = pool is not None and not pool.enable_caching
            why = "prefix caching is disabled" if caching_off else "this vLLM's pool lacks the policy's hooks"
            logger.warning("vllm-nf4kv: request prefix-cache TTLs have no effect: %s", why)
        return
    _activate(scheduler, pool)
    logger.info("vllm-nf4kv: request prefix-cache TTLs on (first request with %s)", REQUEST_KEY)


def attach_stats(scheduler: Any, stats: Any) -> None:
    """Add the payload (``metrics.PAYLOAD_*`` keys) to ``stats.num_kv_fetch_reqs_by_stage``.

    Without the policy on the pool (an nf4 engine with no TTL yet) only the
    memory gauges and "TTL off" travel: vLLM's pool keeps no cached-block count.
    """
    report = getattr(scheduler, "_nf4kv_report", None)
    if report is None or stats is None:
        return
    kv_bytes, kv_bf16_bytes = report["memory"]
    payload = {
        PAYLOAD_KV_BYTES: kv_bytes,
        PAYLOAD_KV_BF16_BYTES: kv_bf16_bytes,
        PAYLOAD_TTL_MS: ttl_to_ms(None),
    }
    pool = getattr(getattr(scheduler, "kv_cache_manager", None), "block_pool", None)
    state = ttl_state(pool)
    if state is not None:
        if state.policy:
            pool.nf4kv_sweep(STATS_SWEEP_BUDGET)
        reported_server, reported_request = report["expired_reported"]
        payload.update(
            {
                PAYLOAD_EXPIRED: state.expired_by_server - reported_server,
                PAYLOAD_EXPIRED_REQUEST: state.expired_by_request - reported_request,
                PAYLOAD_CACHED: state.cached_blocks,
                PAYLOAD_TTL_MS: ttl_to_ms(state.ttl_s),
            }
        )
        report["expired_reported"] = (state.expired_by_server, state.expired_by_request)
    stats.num_kv_fetch_reqs_by_stage.update(payload)


def wrap_make_stats(scheduler: Any) -> None:
    """Target: ``make_stats`` of ONE ``vllm.v1.core.sched.scheduler.Scheduler`` instance.

    Why: the pool lives in the engine core, ``/metrics`` in the API server, and
    a Prometheus metric set in the engine core never reaches ``/metrics`` under
    a plain ``vllm serve``. ``SchedulerStats`` (a fixed dataclass, msgspec drops
    extra attributes) is what already travels to the front end each step.
    How: an instance attribute ``make_stats`` wrapping the class's method; it
    adds ``nf4kv:*`` integer keys to the returned stats'
    ``num_kv_fetch_reqs_by_stage`` (``dict[str, int]``, which vLLM's loggers
    read by known stage names only); ``ttl.patches.ttl_stats_logger`` removes them in the
    front end before vLLM's loggers run. Called by ``ttl.engine`` only for a
    scheduler with a TTL (or an nf4 cache, for its memory gauges), so every
    other engine keeps vLLM's own stats path, and only where
    ``ttl.engine.STATS_HOOKED`` says the front end takes the keys out.
    Versions: 0.32, 0.33 and 0.34. Removed by: an extension field for plugin stats
    in ``SchedulerStats`` (none yet).
    """
    if "make_stats" in vars(scheduler):
        return
    original = type(scheduler).make_stats

    @functools.wraps(original)
    def make_stats(*args: Any, **kwargs: Any) -> Any:
        stats = original(scheduler, *args, **kwargs)
        attach_stats(scheduler, stats)
        return stats

    scheduler.make_stats = make_stats
