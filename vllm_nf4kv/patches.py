"""Every monkeypatch this plugin applies to vLLM, and nothing else.

Each patch is one function with a note: why, what it replaces, which vLLM
versions need it, and what upstream change would remove it. Each checks for the
feature it patches (never a version string) and is safe to call many times.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from vllm_nf4kv.format import KV_CACHE_DTYPE

# ----------------------------------------------------------------------------
# --kv-cache-dtype nf4 on vLLM without register_kv_cache_dtype (0.32)
# ----------------------------------------------------------------------------


def accept_nf4_cache_dtype_without_hook() -> None:
    """Make ``nf4`` a valid ``--kv-cache-dtype`` where vLLM has no registration hook.

    Why: vLLM 0.32 (the CPU wheel) validates the value against the closed
    ``CacheDType`` Literal in three places: the pydantic ``CacheConfig`` field
    (which also feeds the CLI ``choices``), an assert in
    ``vllm.v1.attention.selector.get_attn_backend``, and the
    ``STR_DTYPE_TO_TORCH_DTYPE`` table that sizes cache tensors.
    What it replaces: ``vllm.config.cache.CacheDType`` and
    ``vllm.v1.attention.selector.CacheDType`` with the same Literal plus
    ``"nf4"``; the ``CacheConfig.cache_dtype`` annotation (pydantic schema
    rebuilt); adds ``STR_DTYPE_TO_TORCH_DTYPE["nf4"] = torch.uint8``.
    Versions: vLLM <= 0.32. Removed by: ``vllm.config.cache.register_kv_cache_dtype``
    (vLLM 0.33), which :mod:`vllm_nf4kv.registration` uses when present.
    """
    import pydantic
    import torch
    from vllm.config import cache as cache_module
    from vllm.utils import torch_utils
    from vllm.v1.attention import selector

    torch_utils.STR_DTYPE_TO_TORCH_DTYPE[KV_CACHE_DTYPE] = torch.uint8
    if KV_CACHE_DTYPE in get_args(cache_module.CacheDType):
        return
    extended = Literal[(*get_args(cache_module.CacheDType), KV_CACHE_DTYPE)]  # type: ignore[valid-type]
    cache_module.CacheDType = extended
    selector.CacheDType = extended
    config_cls: Any = cache_module.CacheConfig
    config_cls.__annotations__["cache_dtype"] = extended
    config_cls.__dataclass_fields__["cache_dtype"].type = extended
    pydantic.dataclasses.rebuild_dataclass(config_cls, force=True)


# ----------------------------------------------------------------------------
# Attention backend selection for nf4 (every vLLM version)
# ----------------------------------------------------------------------------


def route_nf4_to_plugin_backend() -> None:
    """Send layers with ``kv_cache_dtype == "nf4"`` to this plugin's backend.

    Why: vLLM's CPU platform always answers ``CPU_ATTN`` (whose C++ kernels
    would silently read uint8 NF4 pages as fp8 and return garbage), and the
    CUDA platform has no rule that maps a plugin dtype to a backend. Routing
    in the platform keeps every other dtype on vLLM's own untouched path,
    and lets nf4 refuse what it cannot serve (MLA, encoder attention, sinks,
    a forced incompatible ``--attention-backend``) with a clear error at
    model construction instead of wrong output.
    What it replaces: ``get_attn_backend_cls`` of the current platform class
    (``CpuPlatform`` / ``CudaPlatform``) with a wrapper that calls the original
    for every dtype but nf4. Versions: 0.32 and 0.33 (same signature).
    Removed by: an upstream per-dtype backend hook on the platform (the
    0.33 ``KVCacheDTypeHandler`` has none yet).
    """
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    if getattr(platform_cls.get_attn_backend_cls, "_nf4kv_wrapped", False):
        return
    original = platform_cls.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):  # noqa: ANN001
        if attn_selector_config.kv_cache_dtype != KV_CACHE_DTYPE:
            return original(cls, selected_backend, attn_selector_config, *args, **kwargs)
        from vllm_nf4kv.backends.selection import select_nf4_backend

        return select_nf4_backend(current_platform, selected_backend, attn_selector_config)

    get_attn_backend_cls._nf4kv_wrapped = True  # type: ignore[attr-defined]
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)

# ----------------------------------------------------------------------------
# Prefix-cache TTL (issue 4)
# ----------------------------------------------------------------------------


#
# The policy itself is not a patch: ``vllm_nf4kv.ttl.pool.enable_ttl`` switches
# the class of ONE pool instance (the scheduler's) to a subclass of its own
# class, and request TTLs switch the class of the scheduler's KV-cache manager
# instance the same way (``ttl.engine.ttl_manager_class``). These six patches
# only decide where that happens, validate requests and carry the metrics;
# docs/ttl.md has the whole picture.

_TTL_PATCH_MARK = "_nf4kv_ttl_patch"


def _ttl_patched(function: Any) -> bool:
    return bool(getattr(function, _TTL_PATCH_MARK, False))


def _ttl_logger() -> Any:
    import logging

    return logging.getLogger("vllm.nf4kv.ttl")


def ttl_validate_engine_config() -> None:
    """Target: ``vllm.engine.arg_utils.EngineArgs.create_engine_config``.

    Why: a bad TTL (negative, NaN, not a number) must stop startup with a clear
    message at once; the scheduler that applies the TTL is built only after the
    model is loaded, and under ``vllm serve`` in another process.
    How: wraps the method; the ``VllmConfig`` it returns goes through
    ``vllm_nf4kv.ttl.engine.check_config`` (raises ``ValueError``).
    Versions: 0.32 and 0.33 (same method). Removed by: a vLLM hook that lets a
    plugin validate its ``additional_config`` section (none yet).
    """
    import functools

    from vllm.engine.arg_utils import EngineArgs

    original = getattr(EngineArgs, "create_engine_config", None)
    if not callable(original) or _ttl_patched(original):
        return
    from vllm_nf4kv.ttl.engine import check_config

    @functools.wraps(original)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        vllm_config = original(self, *args, **kwargs)
        check_config(vllm_config)
        return vllm_config

    setattr(create_engine_config, _TTL_PATCH_MARK, True)
    EngineArgs.create_engine_config = create_engine_config


def ttl_on_scheduler_pool() -> bool:
    """Target: ``vllm.v1.core.sched.scheduler.Scheduler.__init__``.

    Why: the TTL belongs on the scheduler's block pool only, and the scheduler
    is the one engine object that receives ``vllm_config`` (the KV-cache
    manager and coordinator do not; CPU-offload pools are built the same way
    as the scheduler's and must keep vLLM's behaviour).
    How: wraps ``__init__``; afterwards ``ttl.engine.install_on_scheduler``
    resolves the TTL and calls ``ttl.pool.enable_ttl`` on
    ``self.kv_cache_manager.block_pool`` (also with the TTL off: it then only
    counts cached blocks for the metrics). Subclasses (``AsyncScheduler``)
    inherit it. Versions: 0.32 and 0.33 (``__init__(vllm_config,
    kv_cache_config, ...)``). Removed by: a vLLM block-pool policy hook or a
    prefix-cache TTL upstream (none yet). Returns whether it is in place.
    """
    import functools
    import inspect

    from vllm.v1.core.sched.scheduler import Scheduler

    original = Scheduler.__init__
    if _ttl_patched(original):
        return True
    parameters = inspect.signature(original).parameters
    if "vllm_config" not in parameters or "kv_cache_config" not in parameters:
        _ttl_logger().warning("vllm-nf4kv: Scheduler.__init__ has an unknown signature; no prefix-cache TTL")
        return False
    from vllm_nf4kv.ttl.engine import install_on_scheduler

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        install_on_scheduler(self)

    setattr(__init__, _TTL_PATCH_MARK, True)
    Scheduler.__init__ = __init__
    return True


def _ttl_stats_carrier_ok() -> bool:
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


def ttl_stats_payload() -> None:
    """Target: ``vllm.v1.core.sched.scheduler.Scheduler.make_stats``.

    Why: the pool lives in the engine core, ``/metrics`` in the API server, and
    a Prometheus metric set in the engine core never reaches ``/metrics`` under
    a plain ``vllm serve``. ``SchedulerStats`` (a fixed dataclass, msgspec drops
    extra attributes) is what already travels to the front end each step.
    How: wraps ``make_stats``; adds ``nf4kv:*`` integer keys to the returned
    stats' ``num_kv_fetch_reqs_by_stage`` (``dict[str, int]``, which vLLM's
    loggers read by known stage names only); ``ttl_stats_logger`` removes them
    in the front end before vLLM's loggers run. Installed only together with
    that one. Versions: 0.32 and 0.33. Removed by: an extension field for
    plugin stats in ``SchedulerStats`` (none yet).
    """
    import functools

    from vllm.v1.core.sched.scheduler import Scheduler

    original = getattr(Scheduler, "make_stats", None)
    if not callable(original) or _ttl_patched(original):
        return
    from vllm_nf4kv.ttl.engine import attach_stats

    @functools.wraps(original)
    def make_stats(self: Any, *args: Any, **kwargs: Any) -> Any:
        stats = original(self, *args, **kwargs)
        attach_stats(self, stats)
        return stats

    setattr(make_stats, _TTL_PATCH_MARK, True)
    Scheduler.make_stats = make_stats


def ttl_stats_logger() -> bool:
    """Target: ``vllm.v1.metrics.loggers.StatLoggerManager.__init__``.

    Why: the front end must record the TTL payload on ``/metrics`` and take it
    out of ``num_kv_fetch_reqs_by_stage`` before vLLM's loggers see that dict
    (the console logger prints a "KV fetch" line when any value in it is set).
    How: wraps ``__init__``; puts a ``ttl.frontend.TTLStatLogger`` (a vLLM
    ``AggregateStatLoggerBase``) at index 0 of ``self.stat_loggers``, which
    ``record`` calls in order. Metrics are ``nf4kv:*`` (vLLM unregisters
    ``vllm:*`` collectors when it rebuilds its loggers). Versions: 0.32 and
    0.33. Removed by: the same ``SchedulerStats`` extension field. Returns
    whether it is in place.
    """
    import functools

    from vllm.v1.metrics import loggers

    manager_cls = getattr(loggers, "StatLoggerManager", None)
    if manager_cls is None or not hasattr(loggers, "AggregateStatLoggerBase"):
        return False
    original = manager_cls.__init__
    if _ttl_patched(original):
        return True
    from vllm_nf4kv.ttl.frontend import TTLStatLogger

    @functools.wraps(original)
    def __init__(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        original(self, vllm_config, *args, **kwargs)
        stat_loggers = getattr(self, "stat_loggers", None)
        if isinstance(stat_loggers, list):
            stat_loggers.insert(0, TTLStatLogger(vllm_config, getattr(self, "engine_indexes", None)))

    setattr(__init__, _TTL_PATCH_MARK, True)
    manager_cls.__init__ = __init__
    return True


def ttl_request_on_scheduler() -> bool:
    """Target: ``vllm.v1.core.sched.scheduler.Scheduler.add_request``.

    Why: a request may set its own prefix-cache TTL (``vllm_xargs``
    ``nf4kv_prefix_ttl_s``); until the first one does, nothing should run per
    allocation, for any dtype. How: wraps ``add_request(request)``; afterwards
    ``ttl.engine.on_add_request`` turns request TTLs on for this engine when
    the request sets one (policy on the scheduler's pool, the TTL scope on its
    KV-cache manager instance). Versions: 0.32 and 0.33 (same signature).
    Removed by: per-request cache retention upstream (RFC vllm#37003, PR
    vllm#38514, open). Returns whether it is in place.
    """
    import functools
    import inspect

    from vllm.v1.core.sched.scheduler import Scheduler

    original = getattr(Scheduler, "add_request", None)
    if not callable(original):
        return False
    if _ttl_patched(original):
        return True
    if list(inspect.signature(original).parameters) != ["self", "request"]:
        _ttl_logger().warning("vllm-nf4kv: Scheduler.add_request has an unknown signature; no request TTLs")
        return False
    from vllm_nf4kv.ttl.engine import on_add_request

    @functools.wraps(original)
    def add_request(self: Any, request: Any) -> None:
        original(self, request)
        on_add_request(self, request)

    setattr(add_request, _TTL_PATCH_MARK, True)
    Scheduler.add_request = add_request
    return True


def ttl_validate_request() -> bool:
    """Target: ``vllm.v1.engine.input_processor.InputProcessor._validate_params``.

    Why: a bad request TTL (negative, NaN, not a number, above the server's
    ``max_request_ttl_s``) must be the client's error (HTTP 400 with the reason)
    before the request reaches the engine, never a server error or a silently
    ignored setting. ``_validate_params`` is where vLLM checks every request's
    ``SamplingParams`` in the front end (API server and offline ``LLM``), with
    the engine's ``vllm_config`` at hand. How: wraps it; afterwards the request
    TTL in ``params.extra_args`` goes through ``ttl.config.parse_request_ttl``,
    and a ``ValueError`` becomes vLLM's ``VLLMValidationError`` (a 400).
    Versions: 0.32 and 0.33 (``_validate_params(params, supported_tasks)``).
    Removed by: a vLLM hook for plugins to validate ``extra_args`` (none yet).
    Returns whether it is in place.
    """
    import functools
    import inspect

    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    original = getattr(InputProcessor, "_validate_params", None)
    if not callable(original):
        return False
    if _ttl_patched(original):
        return True
    if list(inspect.signature(original).parameters)[:3] != ["self", "params", "supported_tasks"]:
        _ttl_logger().warning("vllm-nf4kv: InputProcessor._validate_params has an unknown signature")
        return False
    from vllm_nf4kv.ttl.config import REQUEST_KEY, parse_request_ttl, resolve_ttl

    @functools.wraps(original)
    def _validate_params(self: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, params, *args, **kwargs)
        extra_args = getattr(params, "extra_args", None)
        if extra_args and extra_args.get(REQUEST_KEY) is not None:
            setting = getattr(self, "_nf4kv_ttl_setting", None)
            if setting is None:
                setting = self._nf4kv_ttl_setting = resolve_ttl(self.vllm_config.additional_config)
            try:
                parse_request_ttl(extra_args[REQUEST_KEY], setting.max_request_ttl_s)
            except ValueError as error:
                raise VLLMValidationError(
                    str(error), parameter=f"vllm_xargs.{REQUEST_KEY}", value=extra_args[REQUEST_KEY]
                ) from None
        return result

    setattr(_validate_params, _TTL_PATCH_MARK, True)
    InputProcessor._validate_params = _validate_params
    return True


def install_block_pool_ttl() -> None:
    """Install the prefix-cache TTL patches above (called by ``plugin.register``).

    Never raises for an unsupported vLLM: a missing target is logged and its
    patch skipped. A TTL set on a vLLM where the scheduler patch is missing is
    refused at startup by ``ttl.engine.check_config``; a request TTL on a vLLM
    where either request patch is missing is refused by ``check_config`` too
    when ``max_request_ttl_s`` is set, and otherwise logged here.
    """
    from vllm_nf4kv.ttl import engine

    log = _ttl_logger()
    try:
        ttl_validate_engine_config()
    except (ImportError, AttributeError) as error:
        log.warning("vllm-nf4kv: no early prefix-cache TTL validation (%s)", error)
    try:
        engine.SCHEDULER_HOOKED = ttl_on_scheduler_pool()
    except (ImportError, AttributeError) as error:
        log.warning("vllm-nf4kv: prefix-cache TTL unavailable (%s)", error)
    requests_hooked = False
    try:
        requests_hooked = ttl_request_on_scheduler() and ttl_validate_request()
    except (ImportError, AttributeError) as error:
        log.warning("vllm-nf4kv: request prefix-cache TTLs unavailable (%s)", error)
    engine.REQUESTS_HOOKED = requests_hooked and engine.SCHEDULER_HOOKED
    try:
        if _ttl_stats_carrier_ok() and ttl_stats_logger():
            ttl_stats_payload()
        else:
            log.warning("vllm-nf4kv: prefix-cache TTL metrics unavailable on this vLLM")
    except (ImportError, AttributeError) as error:
        log.warning("vllm-nf4kv: prefix-cache TTL metrics unavailable (%s)", error)
