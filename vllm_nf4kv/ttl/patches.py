"""The prefix-cache TTL's patches of vLLM: where the policy is installed, and how its metrics travel.

The policy itself is not a patch: :func:`vllm_nf4kv.ttl.pool.enable_ttl` switches the
class of ONE pool instance (the scheduler's) to a subclass of its own class, and request
TTLs switch the class of the scheduler's KV-cache manager instance the same way
(``ttl.engine.ttl_manager_class``); both happen only once a TTL is configured or a request
sets one. The patches below only decide where that happens and carry the metrics; requests
are validated by the settings feature (``vllm_nf4kv.patches.validate_request_args``);
docs/ttl.md has the whole picture and ``vllm_nf4kv.patches.PATCH_INDEX`` lists every target.
Every change goes through :mod:`vllm_nf4kv.journal`.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

from vllm_nf4kv import journal
from vllm_nf4kv.ttl import engine

logger = logging.getLogger("vllm.nf4kv.ttl")


def ttl_on_scheduler_pool() -> bool:
    """Target: ``vllm.v1.core.sched.scheduler.Scheduler.__init__``.

    Why: the TTL belongs on the scheduler's block pool only, and the scheduler
    is the one engine object that receives ``vllm_config`` (the KV-cache
    manager and coordinator do not; CPU-offload pools are built the same way
    as the scheduler's and must keep vLLM's behaviour).
    How: wraps ``__init__``; afterwards ``ttl.engine.install_on_scheduler``
    resolves the TTL and, only when one is set, calls ``ttl.pool.enable_ttl``
    on ``self.kv_cache_manager.block_pool``. Subclasses (``AsyncScheduler``)
    inherit it. Versions: 0.32, 0.33 and 0.34 (``__init__(vllm_config,
    kv_cache_config, ...)``). Removed by: a vLLM block-pool policy hook or a
    prefix-cache TTL upstream (none yet). Returns whether it is in place.
    """
    from vllm.v1.core.sched.scheduler import Scheduler

    original = Scheduler.__init__
    if journal.is_wrapper(original):
        return True
    parameters = inspect.signature(original).parameters
    if "vllm_config" not in parameters or "kv_cache_config" not in parameters:
        logger.warning("vllm-nf4kv: Scheduler.__init__ has an unknown signature; no prefix-cache TTL")
        return False
    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        engine.install_on_scheduler(self)

    journal.mark_wrapper(__init__)
    journal.replace(Scheduler, "__init__", __init__)
    return True


def stats_carrier_ok() -> bool:
    """Whether ``SchedulerStats.num_kv_fetch_reqs_by_stage`` is a ``dict[str, int]`` field."""
    import dataclasses
    import typing

    from vllm.v1.metrics.stats import SchedulerStats

    if not dataclasses.is_dataclass(SchedulerStats):
        return False
    field = {f.name: f for f in dataclasses.fields(SchedulerStats)}.get("num_kv_fetch_reqs_by_stage")
    if field is None:
        return False
    return typing.get_origin(field.type) is dict and typing.get_args(field.type) == (str, int)


def ttl_stats_logger() -> bool:
    """Target: ``vllm.v1.metrics.loggers.StatLoggerManager.__init__``.

    Why: the front end must record the TTL payload on ``/metrics`` and take it
    out of ``num_kv_fetch_reqs_by_stage`` before vLLM's loggers see that dict
    (the console logger prints a "KV fetch" line when any value in it is set).
    How: wraps ``__init__``; puts a ``ttl.frontend.TTLStatLogger`` (a vLLM
    ``AggregateStatLoggerBase``) at index 0 of ``self.stat_loggers``, which
    ``record`` calls in order. Metrics are ``nf4kv:*`` (vLLM unregisters
    ``vllm:*`` collectors when it rebuilds its loggers). Versions: 0.32, 0.33
    and 0.34. Removed by: the same ``SchedulerStats`` extension field. Returns
    whether it is in place.
    """
    from vllm.v1.metrics import loggers

    manager_cls = getattr(loggers, "StatLoggerManager", None)
    if manager_cls is None or not hasattr(loggers, "AggregateStatLoggerBase"):
        return False
    original = manager_cls.__init__
    if journal.is_wrapper(original):
        return True
    journal.check_signature(original, ["self", "vllm_config"], "StatLoggerManager.__init__")
    from vllm_nf4kv.ttl.frontend import TTLStatLogger

    @functools.wraps(original)
    def __init__(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        original(self, vllm_config, *args, **kwargs)
        stat_loggers = getattr(self, "stat_loggers", None)
        if isinstance(stat_loggers, list):
            stat_loggers.insert(0, TTLStatLogger(vllm_config, getattr(self, "engine_indexes", None)))

    journal.mark_wrapper(__init__)
    journal.replace(manager_cls, "__init__", __init__)
    return True


def ttl_request_on_scheduler() -> bool:
    """Target: ``vllm.v1.core.sched.scheduler.Scheduler.add_request``.

    Why: a request may set its own prefix-cache TTL (``vllm_xargs``
    ``nf4kv_prefix_ttl_s``); until the first one does, nothing should run per
    allocation, for any dtype. How: wraps ``add_request(request)``; afterwards
    ``ttl.engine.on_add_request`` turns request TTLs on for this engine when
    the request sets one (policy on the scheduler's pool, the TTL scope on its
    KV-cache manager instance). Versions: 0.32, 0.33 and 0.34 (same signature).
    Removed by: per-request cache retention upstream (RFC vllm#37003, PR
    vllm#38514, open). Returns whether it is in place.
    """
    from vllm.v1.core.sched.scheduler import Scheduler

    original = getattr(Scheduler, "add_request", None)
    if not callable(original):
        return False
    if journal.is_wrapper(original):
        return True
    if list(inspect.signature(original).parameters) != ["self", "request"]:
        logger.warning("vllm-nf4kv: Scheduler.add_request has an unknown signature; no request TTLs")
        return False
    @functools.wraps(original)
    def add_request(self: Any, request: Any) -> None:
        original(self, request)
        engine.on_add_request(self, request)

    journal.mark_wrapper(add_request)
    journal.replace(Scheduler, "add_request", add_request)
    return True


def install_ttl() -> None:
    """Install the prefix-cache TTL patches above (called by ``plugin.register``).

    A target this vLLM does not have is logged and its patch skipped (the
    ``ttl.engine.*_HOOKED`` flags record what is in place): a TTL set on a vLLM
    where the scheduler patch is missing is refused at startup by
    ``ttl.engine.check_config``, and so is ``max_request_ttl_s`` where the
    ``add_request`` patch is missing (request TTLs are then refused per request by
    :func:`validate_request_args`). Anything else that goes wrong raises, and
    ``plugin.register`` undoes the whole feature.
    """
    log = logger
    scheduler_hooked = ttl_on_scheduler_pool()
    requests_hooked = scheduler_hooked and ttl_request_on_scheduler()
    stats_hooked = stats_carrier_ok() and ttl_stats_logger()
    if not stats_hooked:
        log.warning("vllm-nf4kv: prefix-cache TTL metrics unavailable on this vLLM")
    for flag, value in (
        ("SCHEDULER_HOOKED", scheduler_hooked),
        ("REQUESTS_HOOKED", requests_hooked),
        ("STATS_HOOKED", stats_hooked),
    ):
        if getattr(engine, flag) != value:
            journal.replace(engine, flag, value)
