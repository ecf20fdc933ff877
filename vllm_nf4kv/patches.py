"""Every monkeypatch this plugin applies to vLLM, and nothing else.

Each patch is one function with a note: why, what it replaces, which vLLM
versions need it, and what upstream change would remove it. Each checks for the
feature it patches (never a version string) and is safe to call many times.

Every change to vLLM goes through :func:`_replace` or :func:`on_undo`, which
keep a journal, so :func:`undo_to` can put vLLM back exactly as it was: a
feature that fails half-way through installing (``plugin.register``) leaves
nothing of itself behind.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Literal, get_args

from vllm_nf4kv.format import KV_CACHE_DTYPE

# ----------------------------------------------------------------------------
# The journal
# ----------------------------------------------------------------------------

_MISSING = object()
_UNDO: list[Callable[[], None]] = []


def _replace(owner: Any, name: str, value: Any) -> None:
    """``setattr(owner, name, value)``, remembering what was there.

    For a class, what was there is its own ``__dict__`` entry (the raw
    ``classmethod`` or function, or nothing when the attribute is inherited),
    so undoing restores the class exactly.
    """
    old = owner.__dict__.get(name, _MISSING) if isinstance(owner, type) else getattr(owner, name, _MISSING)
    setattr(owner, name, value)

    def undo() -> None:
        if old is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, old)

    _UNDO.append(undo)


def _set_item(mapping: Any, key: Any, value: Any) -> None:
    """``mapping[key] = value``, remembering what was there."""
    old = mapping.get(key, _MISSING)
    mapping[key] = value

    def undo() -> None:
        if old is _MISSING:
            mapping.pop(key, None)
        else:
            mapping[key] = old

    _UNDO.append(undo)


def on_undo(undo: Callable[[], None]) -> None:
    """Record how to undo a change made through a vLLM API (e.g. its 0.33 dtype hook)."""
    _UNDO.append(undo)


def journal_mark() -> int:
    """A point in the journal to come back to with :func:`undo_to`."""
    return len(_UNDO)


def undo_to(mark: int = 0) -> None:
    """Undo, newest first, every change recorded since ``mark``."""
    while len(_UNDO) > mark:
        _UNDO.pop()()


def _check_signature(function: Any, expected: list[str], target: str) -> None:
    """Raise ``UnsupportedVLLMError`` unless ``function``'s leading parameters are ``expected``."""
    got = list(inspect.signature(function).parameters)
    if got[: len(expected)] != expected:
        from vllm_nf4kv.registration import UnsupportedVLLMError

        raise UnsupportedVLLMError(
            f"{target} takes ({', '.join(got)}); vllm-nf4kv wraps ({', '.join(expected)}, ...)"
        )


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

    if KV_CACHE_DTYPE in get_args(cache_module.CacheDType):
        return
    extended = Literal[(*get_args(cache_module.CacheDType), KV_CACHE_DTYPE)]  # type: ignore[valid-type]
    config_cls: Any = cache_module.CacheConfig
    field = config_cls.__dataclass_fields__["cache_dtype"]
    # Recorded first, so undone last: the schema is rebuilt once the fields below are restored.
    on_undo(lambda: pydantic.dataclasses.rebuild_dataclass(config_cls, force=True))
    _replace(cache_module, "CacheDType", extended)
    _replace(selector, "CacheDType", extended)
    _set_item(torch_utils.STR_DTYPE_TO_TORCH_DTYPE, KV_CACHE_DTYPE, torch.uint8)
    _set_item(config_cls.__annotations__, "cache_dtype", extended)
    _replace(field, "type", extended)
    pydantic.dataclasses.rebuild_dataclass(config_cls, force=True)


def undo_on_failure_kv_cache_dtype_hook() -> None:
    """Target: what ``vllm.config.cache.register_kv_cache_dtype("nf4")`` writes (vLLM 0.33, 0.34).

    Why: the hook is vLLM's public way in, but it has no way out; when a later
    step of ``plugin.register`` fails, "nf4" must not stay accepted without its
    backend (vLLM's kernels would read NF4 pages as another format).
    How: records, in the journal, the removal of "nf4" from the three places the
    0.33.0 hook writes: ``KV_CACHE_DTYPES``, ``STR_DTYPE_TO_TORCH_DTYPE`` and
    ``_KV_CACHE_DTYPE_HANDLERS``; call it before the hook. Versions: 0.33, 0.34 (same hook).
    Removed by: an unregister call upstream (none yet).
    """
    from vllm.config import cache as cache_module
    from vllm.utils import torch_utils

    def undo() -> None:
        dtypes = getattr(cache_module, "KV_CACHE_DTYPES", None)
        if isinstance(dtypes, list) and KV_CACHE_DTYPE in dtypes:
            dtypes.remove(KV_CACHE_DTYPE)
        torch_utils.STR_DTYPE_TO_TORCH_DTYPE.pop(KV_CACHE_DTYPE, None)
        handlers = getattr(cache_module, "_KV_CACHE_DTYPE_HANDLERS", None)
        if isinstance(handlers, dict):
            handlers.pop(KV_CACHE_DTYPE, None)

    on_undo(undo)


# ----------------------------------------------------------------------------
# Attention backend selection for nf4 (every vLLM version)
# ----------------------------------------------------------------------------


def check_nf4_quality_after_loading() -> None:
    """Check nf4's calibration against the loaded model: every layer covered, biased keys calibrated.

    Why: whether a model's projections add a bias to its keys is known only from its
    loaded weights, and attention backends see neither (``quality_gate``); a layer's name
    (what its calibration is looked up by) is known to its impl only on its first call, too
    late for a file that lacks it.
    What it replaces: ``vllm.model_executor.model_loader.base_loader
    .process_weights_after_loading`` (the name ``BaseModelLoader.load_model`` calls, so every
    loader built on it) with a wrapper that calls it, then
    ``backends.smoothing.resolve_model_layers`` and ``quality_gate.check_loaded_model``.
    Versions: vLLM 0.32, 0.33 and 0.34 (the same name and call in each). Upstream: none (no hook
    hands a backend its layer's weights).
    Removed by: a backend hook that sees the layer's projections after loading.
    """
    from vllm.model_executor.model_loader import base_loader

    original = base_loader.process_weights_after_loading
    if getattr(original, "_nf4kv_quality_gate", False):
        return
    _check_signature(original, ["model", "model_config", "target_device"], "process_weights_after_loading")

    @functools.wraps(original)
    def process_weights_then_check(model: Any, model_config: Any, target_device: Any) -> None:
        from vllm_nf4kv.backends.smoothing import resolve_model_layers
        from vllm_nf4kv.quality_gate import check_loaded_model

        original(model, model_config, target_device)
        resolve_model_layers(model)
        check_loaded_model(model)

    process_weights_then_check._nf4kv_quality_gate = True  # type: ignore[attr-defined]
    _replace(base_loader, "process_weights_after_loading", process_weights_then_check)


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
    for every dtype but nf4. Versions: 0.32, 0.33 and 0.34 (same signature).
    Removed by: an upstream per-dtype backend hook on the platform (the
    0.33 ``KVCacheDTypeHandler`` has none yet).
    """
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    if getattr(platform_cls.get_attn_backend_cls, "_nf4kv_wrapped", False):
        return
    original = platform_cls.get_attn_backend_cls.__func__
    _check_signature(
        original,
        ["cls", "selected_backend", "attn_selector_config"],
        f"{platform_cls.__qualname__}.get_attn_backend_cls",
    )

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):  # noqa: ANN001
        if attn_selector_config.kv_cache_dtype != KV_CACHE_DTYPE:
            return original(cls, selected_backend, attn_selector_config, *args, **kwargs)
        from vllm_nf4kv.backends.selection import select_nf4_backend

        return select_nf4_backend(current_platform, selected_backend, attn_selector_config)

    get_attn_backend_cls._nf4kv_wrapped = True  # type: ignore[attr-defined]
    _replace(platform_cls, "get_attn_backend_cls", classmethod(get_attn_backend_cls))


# ----------------------------------------------------------------------------
# Startup validation of the nf4kv settings (every vLLM version)
# ----------------------------------------------------------------------------


def validate_engine_config() -> None:
    """Target: ``vllm.engine.arg_utils.EngineArgs.create_engine_config``.

    Why: an unknown ``nf4kv`` key or ``NF4KV_*`` variable (a typo), or a bad
    TTL (negative, NaN, not a number), must stop startup with a clear message
    at once; vLLM passes ``additional_config`` through unchecked, and the
    scheduler that applies the TTL is built only after the model is loaded,
    under ``vllm serve`` in another process.
    How: wraps the method; the ``VllmConfig`` it returns goes through
    ``vllm_nf4kv.settings.check_settings`` and ``vllm_nf4kv.ttl.engine.check_config``
    (both raise ``ValueError``). Versions: 0.32, 0.33 and 0.34 (same method).
    Removed by: a vLLM hook that lets a plugin validate its
    ``additional_config`` section (none yet).
    """
    from vllm.engine.arg_utils import EngineArgs

    original = getattr(EngineArgs, "create_engine_config", None)
    if not callable(original) or _ttl_patched(original):
        return
    from vllm_nf4kv.settings import check_settings
    from vllm_nf4kv.ttl.engine import check_config

    @functools.wraps(original)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        vllm_config = original(self, *args, **kwargs)
        check_settings(getattr(vllm_config, "additional_config", None))
        check_config(vllm_config)
        return vllm_config

    setattr(create_engine_config, _TTL_PATCH_MARK, True)
    _replace(EngineArgs, "create_engine_config", create_engine_config)


def validate_request_args() -> None:
    """Target: ``vllm.v1.engine.input_processor.InputProcessor._validate_params``.

    Why: what a request sets in ``vllm_xargs`` must be right or the client's error
    (HTTP 400 with the reason) before the request reaches the engine, never a server
    error or a silently ignored setting: an unknown ``nf4kv_*`` key (a typo, named with
    the closest known one), a bad request TTL (negative, NaN, not a number, above the
    server's ``max_request_ttl_s``), and any request TTL where the prefix-cache TTL
    feature is unavailable (its self-check failed, or a hook is missing). vLLM passes
    ``vllm_xargs`` through unchecked; ``_validate_params`` is where it checks every
    request's ``SamplingParams`` in the front end (API server and offline ``LLM``),
    with the engine's ``vllm_config`` at hand. Part of the settings validation, not of
    the TTL feature, so it stays in place when the TTL is refused.
    How: wraps it; afterwards ``settings.unknown_request_key`` and
    ``ttl.engine.check_request_ttl`` look at ``params.extra_args``, and a ``ValueError``
    becomes vLLM's ``VLLMValidationError`` (a 400).
    Versions: 0.32, 0.33 and 0.34 (``_validate_params(params, supported_tasks)``).
    Removed by: a vLLM hook for plugins to validate ``extra_args`` (none yet).
    """
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_params
    if _ttl_patched(original):
        return
    _check_signature(original, ["self", "params", "supported_tasks"], "InputProcessor._validate_params")
    from vllm_nf4kv.settings import REQUEST_TTL_KEY, unknown_request_key
    from vllm_nf4kv.ttl.engine import check_request_ttl

    @functools.wraps(original)
    def _validate_params(self: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, params, *args, **kwargs)
        extra_args = getattr(params, "extra_args", None)
        if not extra_args:
            return result
        key = REQUEST_TTL_KEY
        try:
            unknown = unknown_request_key(extra_args)
            if unknown is not None:
                key, error = unknown
                raise error
            if extra_args.get(key) is not None:
                check_request_ttl(self, extra_args[key])
        except ValueError as error:
            value = extra_args[key]
            raise VLLMValidationError(str(error), parameter=f"vllm_xargs.{key}", value=value) from None
        return result

    setattr(_validate_params, _TTL_PATCH_MARK, True)
    _replace(InputProcessor, "_validate_params", _validate_params)


# ----------------------------------------------------------------------------
# Prefix-cache TTL
# ----------------------------------------------------------------------------
#
# The policy itself is not a patch: ``vllm_nf4kv.ttl.pool.enable_ttl`` switches
# the class of ONE pool instance (the scheduler's) to a subclass of its own
# class, and request TTLs switch the class of the scheduler's KV-cache manager
# instance the same way (``ttl.engine.ttl_manager_class``); both happen only
# once a TTL is configured or a request sets one. The patches below only
# decide where that happens, validate requests and carry the metrics;
# docs/ttl.md has the whole picture.

_TTL_PATCH_MARK = "_nf4kv_ttl_patch"


def _ttl_patched(function: Any) -> bool:
    return bool(getattr(function, _TTL_PATCH_MARK, False))


def _ttl_logger() -> Any:
    import logging

    return logging.getLogger("vllm.nf4kv.ttl")


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
    _replace(Scheduler, "__init__", __init__)
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


def ttl_stats_on_scheduler(scheduler: Any) -> None:
    """Target: ``make_stats`` of ONE ``vllm.v1.core.sched.scheduler.Scheduler`` instance.

    Why: the pool lives in the engine core, ``/metrics`` in the API server, and
    a Prometheus metric set in the engine core never reaches ``/metrics`` under
    a plain ``vllm serve``. ``SchedulerStats`` (a fixed dataclass, msgspec drops
    extra attributes) is what already travels to the front end each step.
    How: an instance attribute ``make_stats`` wrapping the class's method; it
    adds ``nf4kv:*`` integer keys to the returned stats'
    ``num_kv_fetch_reqs_by_stage`` (``dict[str, int]``, which vLLM's loggers
    read by known stage names only); ``ttl_stats_logger`` removes them in the
    front end before vLLM's loggers run. Called by ``ttl.engine`` only for a
    scheduler with a TTL (or an nf4 cache, for its memory gauges), so every
    other engine keeps vLLM's own stats path, and only where
    ``ttl.engine.STATS_HOOKED`` says the front end takes the keys out.
    Versions: 0.32, 0.33 and 0.34. Removed by: an extension field for plugin stats
    in ``SchedulerStats`` (none yet).
    """
    if "make_stats" in vars(scheduler):
        return
    from vllm_nf4kv.ttl.engine import attach_stats

    original = type(scheduler).make_stats

    @functools.wraps(original)
    def make_stats(*args: Any, **kwargs: Any) -> Any:
        stats = original(scheduler, *args, **kwargs)
        attach_stats(scheduler, stats)
        return stats

    scheduler.make_stats = make_stats


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
    if _ttl_patched(original):
        return True
    _check_signature(original, ["self", "vllm_config"], "StatLoggerManager.__init__")
    from vllm_nf4kv.ttl.frontend import TTLStatLogger

    @functools.wraps(original)
    def __init__(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        original(self, vllm_config, *args, **kwargs)
        stat_loggers = getattr(self, "stat_loggers", None)
        if isinstance(stat_loggers, list):
            stat_loggers.insert(0, TTLStatLogger(vllm_config, getattr(self, "engine_indexes", None)))

    setattr(__init__, _TTL_PATCH_MARK, True)
    _replace(manager_cls, "__init__", __init__)
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
    _replace(Scheduler, "add_request", add_request)
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
    from vllm_nf4kv.ttl import engine

    log = _ttl_logger()
    scheduler_hooked = ttl_on_scheduler_pool()
    requests_hooked = scheduler_hooked and ttl_request_on_scheduler()
    stats_hooked = _ttl_stats_carrier_ok() and ttl_stats_logger()
    if not stats_hooked:
        log.warning("vllm-nf4kv: prefix-cache TTL metrics unavailable on this vLLM")
    for flag, value in (
        ("SCHEDULER_HOOKED", scheduler_hooked),
        ("REQUESTS_HOOKED", requests_hooked),
        ("STATS_HOOKED", stats_hooked),
    ):
        if getattr(engine, flag) != value:
            _replace(engine, flag, value)
