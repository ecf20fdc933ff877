"""Every monkeypatch of vLLM's classes and functions, and the index of all of them.

Each patch is one function with a note: why, what it replaces, which vLLM
versions need it, and what upstream change would remove it. Each checks for the
feature it patches (never a version string) and is safe to call many times.
The TTL feature's patches live beside the TTL code (:mod:`vllm_nf4kv.ttl.patches`);
:data:`PATCH_INDEX` lists every target of both modules, and ``tests/test_patch_index.py``
checks it against what a clean ``plugin.register()`` changes on the running vLLM (and
docs/patches.md against it).

Every change to vLLM goes through :mod:`vllm_nf4kv.journal`, so a feature that
fails half-way through installing (``plugin.register``) leaves nothing of itself
behind.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal, get_args

from vllm_nf4kv import journal
from vllm_nf4kv.format import KV_CACHE_DTYPE

DTYPE_TABLE = "vllm.utils.torch_utils.STR_DTYPE_TO_TORCH_DTYPE[nf4]"
CACHE_DTYPE_ANNOTATION = "vllm.config.cache.CacheConfig.__annotations__[cache_dtype]"

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
    rebuild = lambda: pydantic.dataclasses.rebuild_dataclass(config_cls, force=True)  # noqa: E731
    journal.on_undo(rebuild, "vllm.config.cache.CacheConfig schema")
    journal.replace(cache_module, "CacheDType", extended)
    journal.replace(selector, "CacheDType", extended)
    journal.set_item(torch_utils.STR_DTYPE_TO_TORCH_DTYPE, KV_CACHE_DTYPE, torch.uint8, DTYPE_TABLE)
    journal.set_item(config_cls.__annotations__, "cache_dtype", extended, CACHE_DTYPE_ANNOTATION)
    journal.replace(field, "type", extended, "vllm.config.cache.CacheConfig.cache_dtype.type")
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

    journal.on_undo(undo, "vllm.config.cache.register_kv_cache_dtype")


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
    if journal.is_wrapper(original):
        return
    journal.check_signature(
        original, ["model", "model_config", "target_device"], "process_weights_after_loading"
    )

    @functools.wraps(original)
    def process_weights_then_check(model: Any, model_config: Any, target_device: Any) -> None:
        from vllm_nf4kv.backends.smoothing import resolve_model_layers
        from vllm_nf4kv.quality_gate import check_loaded_model

        original(model, model_config, target_device)
        resolve_model_layers(model)
        check_loaded_model(model)

    journal.mark_wrapper(process_weights_then_check)
    journal.replace(base_loader, "process_weights_after_loading", process_weights_then_check)


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
    if journal.is_wrapper(platform_cls.get_attn_backend_cls):
        return
    original = platform_cls.get_attn_backend_cls.__func__
    journal.check_signature(
        original,
        ["cls", "selected_backend", "attn_selector_config"],
        f"{platform_cls.__qualname__}.get_attn_backend_cls",
    )

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):  # noqa: ANN001
        if attn_selector_config.kv_cache_dtype != KV_CACHE_DTYPE:
            return original(cls, selected_backend, attn_selector_config, *args, **kwargs)
        from vllm_nf4kv.backends.selection import select_nf4_backend

        return select_nf4_backend(current_platform, selected_backend, attn_selector_config)

    journal.mark_wrapper(get_attn_backend_cls)
    journal.replace(platform_cls, "get_attn_backend_cls", classmethod(get_attn_backend_cls))


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
    if not callable(original) or journal.is_wrapper(original):
        return
    from vllm_nf4kv.settings import check_settings
    from vllm_nf4kv.ttl.engine import check_config

    @functools.wraps(original)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        vllm_config = original(self, *args, **kwargs)
        check_settings(getattr(vllm_config, "additional_config", None))
        check_config(vllm_config)
        return vllm_config

    journal.mark_wrapper(create_engine_config)
    journal.replace(EngineArgs, "create_engine_config", create_engine_config)


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
    if journal.is_wrapper(original):
        return
    journal.check_signature(
        original, ["self", "params", "supported_tasks"], "InputProcessor._validate_params"
    )
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

    journal.mark_wrapper(_validate_params)
    journal.replace(InputProcessor, "_validate_params", _validate_params)


# ----------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchNote:
    """One target vllm-nf4kv changes in vLLM (docs/patches.md is this table)."""

    target: str  # what is changed; ``{platform}``: the current platform class
    patch: str  # the function that changes it
    applies: str  # when: "always", "no dtype hook" (vLLM 0.32), "dtype hook" (0.33, 0.34), "per instance"
    why: str
    check: str  # how the patch makes sure the target is what it expects
    removed_by: str  # the upstream change that would make it unnecessary


_SETTINGS_HOOK = "a vLLM hook for plugins to validate their settings (none yet)"
_DTYPE_TABLE = "vLLM 0.32's closed `CacheDType` Literal has no way in for a plugin dtype"
_NO_HOOK_CHECK = "the Literal is extended only where `register_kv_cache_dtype` is missing"
_HOOKED = "`vllm.config.cache.register_kv_cache_dtype` (vLLM 0.33)"
_STATS_FIELD = "an extension field for plugin stats in `SchedulerStats` (none yet)"

PATCH_INDEX: tuple[PatchNote, ...] = (
    PatchNote(
        "vllm.engine.arg_utils.EngineArgs.create_engine_config", "patches.validate_engine_config", "always",
        "refuse unknown `nf4kv` keys, `NF4KV_*` variables and bad values at startup; vLLM passes "
        "`additional_config` through unchecked", "callable; wrapped once", _SETTINGS_HOOK,
    ),
    PatchNote(
        "vllm.v1.engine.input_processor.InputProcessor._validate_params", "patches.validate_request_args",
        "always", "HTTP 400 for unknown `nf4kv_*` request keys, bad request TTLs, and request TTLs where "
        "the TTL is unavailable; vLLM passes `vllm_xargs` through unchecked",
        "signature (self, params, supported_tasks)",
        "a vLLM hook for plugins to validate `extra_args` (none yet)",
    ),
    PatchNote(
        "vllm.config.cache.CacheDType", "patches.accept_nf4_cache_dtype_without_hook", "no dtype hook",
        _DTYPE_TABLE, _NO_HOOK_CHECK, _HOOKED,
    ),
    PatchNote(
        "vllm.v1.attention.selector.CacheDType", "patches.accept_nf4_cache_dtype_without_hook",
        "no dtype hook", "the selector asserts the dtype against its own copy of the Literal", _NO_HOOK_CHECK,
        _HOOKED,
    ),
    PatchNote(
        "vllm.config.cache.CacheConfig.__annotations__[cache_dtype]",
        "patches.accept_nf4_cache_dtype_without_hook", "no dtype hook",
        "the pydantic field (and the CLI choices) validate against the Literal", _NO_HOOK_CHECK, _HOOKED,
    ),
    PatchNote(
        "vllm.config.cache.CacheConfig.cache_dtype.type", "patches.accept_nf4_cache_dtype_without_hook",
        "no dtype hook", "the dataclass field's type, which the schema is rebuilt from",
        _NO_HOOK_CHECK, _HOOKED,
    ),
    PatchNote(
        "vllm.config.cache.CacheConfig schema", "patches.accept_nf4_cache_dtype_without_hook",
        "no dtype hook", "the pydantic schema is rebuilt with the extended Literal (and again on undo)",
        _NO_HOOK_CHECK, _HOOKED,
    ),
    PatchNote(
        "vllm.utils.torch_utils.STR_DTYPE_TO_TORCH_DTYPE[nf4]", "patches.accept_nf4_cache_dtype_without_hook",
        "no dtype hook", "cache tensors are sized by this table: nf4 pages are uint8",
        _NO_HOOK_CHECK, _HOOKED,
    ),
    PatchNote(
        "vllm.config.cache.register_kv_cache_dtype", "patches.undo_on_failure_kv_cache_dtype_hook",
        "dtype hook", "vLLM's hook has no way out: a feature that fails later must not leave nf4 accepted "
        "without its backend", "records the removal of what the hook writes", "an unregister call upstream",
    ),
    PatchNote(
        "{platform}.get_attn_backend_cls", "patches.route_nf4_to_plugin_backend", "always",
        "send nf4 layers (only them) to the nf4 backend; vLLM's own kernels would read nf4 pages as "
        "another format", "signature (cls, selected_backend, attn_selector_config); self-check",
        "a per-dtype backend hook on the platform (RFC vllm#51751, PR vllm#52670)",
    ),
    PatchNote(
        "vllm.model_executor.model_loader.base_loader.process_weights_after_loading",
        "patches.check_nf4_quality_after_loading", "always",
        "once weights load: every nf4 layer's calibration looked up, uncalibrated key biases refused",
        "signature (model, model_config, target_device)",
        "a backend hook that sees its layer's projections after loading",
    ),
    PatchNote(
        "vllm.v1.core.sched.scheduler.Scheduler.__init__", "ttl.patches.ttl_on_scheduler_pool", "always",
        "put the TTL policy on the scheduler's block pool only, when a TTL is set",
        "parameters vllm_config, kv_cache_config; self-check",
        "a block-pool policy hook or a prefix-cache TTL upstream (none yet)",
    ),
    PatchNote(
        "vllm.v1.core.sched.scheduler.Scheduler.add_request", "ttl.patches.ttl_request_on_scheduler",
        "always",
        "turn request TTLs on at the first request that sets one", "signature (self, request)",
        "per-request cache retention upstream (RFC vllm#37003, PR vllm#38514)",
    ),
    PatchNote(
        "vllm.v1.metrics.loggers.StatLoggerManager.__init__", "ttl.patches.ttl_stats_logger", "always",
        "the TTL stat logger first in the API server: `/metrics` and the payload taken out before "
        "vLLM's loggers", "signature (self, vllm_config); `SchedulerStats` carrier field type",
        _STATS_FIELD,
    ),
    PatchNote(
        "Scheduler.make_stats of one scheduler", "ttl.engine.wrap_make_stats", "per instance",
        "the TTL and nf4 memory payload rides `SchedulerStats` from the engine core to the front end",
        "only on a scheduler with a TTL or an nf4 cache", _STATS_FIELD,
    ),
)  # fmt: skip


def index_targets(platform_cls: type) -> dict[str, PatchNote]:
    """The index by target as the journal names it on this platform."""
    label = f"{platform_cls.__module__}.{platform_cls.__qualname__}"
    return {note.target.replace("{platform}", label): note for note in PATCH_INDEX}


def index_markdown() -> str:
    """docs/patches.md's table (``tests/test_patch_index.py`` keeps the two equal)."""
    rows = ["| target | patch | applies | why | check | removed by |", "|---|---|---|---|---|---|"]
    for note in PATCH_INDEX:
        cells = (f"`{note.target}`", f"`{note.patch}`", note.applies, note.why, note.check, note.removed_by)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
