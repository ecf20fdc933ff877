"""Fail ``plugin.register()`` at every change it makes to vLLM, in a fresh process; print JSON.

Run by ``tests/test_plugin_register.py`` (a fresh interpreter: the test process
has the plugin registered already). For each change ``k`` that a clean
``register()`` makes (every ``journal.replace`` / ``set_item`` / ``on_undo``),
and for a few failures of other kinds, it resets vLLM, makes that change raise,
calls ``register()`` and records: whether it raised, the errors it logged, which
vLLM attributes differ from what they should be (the failing feature's as
before registration, the other features' as after a clean registration), and
whether vLLM still builds an ``auto`` engine configuration.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import vllm_nf4kv.plugin as plugin
from vllm_nf4kv import journal, registration
from vllm_nf4kv.backends import common, selection
from vllm_nf4kv.format import KV_CACHE_DTYPE
from vllm_nf4kv.ttl import pool as ttl_pool

SETTINGS, NF4, TTL = (name for name, _ in plugin.FEATURES)
RESULT_MARK = "register-faults: "  # the result line, among vLLM's log lines


def snapshot() -> dict[str, tuple[str, Any]]:
    """Every vLLM attribute register() may change, by the feature that changes it."""
    from vllm.config import CacheConfig
    from vllm.config import cache as cache_module
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.utils import torch_utils
    from vllm.v1.attention import selector
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.metrics.loggers import StatLoggerManager

    from vllm_nf4kv.ttl import engine

    return {
        "EngineArgs.create_engine_config": (SETTINGS, EngineArgs.__dict__["create_engine_config"]),
        "cache.CacheDType": (NF4, cache_module.CacheDType),
        "selector.CacheDType": (NF4, selector.CacheDType),
        "CacheConfig annotation": (NF4, CacheConfig.__annotations__["cache_dtype"]),
        "CacheConfig field": (NF4, CacheConfig.__dataclass_fields__["cache_dtype"].type),
        "STR_DTYPE_TO_TORCH_DTYPE[nf4]": (NF4, torch_utils.STR_DTYPE_TO_TORCH_DTYPE.get(KV_CACHE_DTYPE)),
        "KV_CACHE_DTYPES": (NF4, tuple(getattr(cache_module, "KV_CACHE_DTYPES", ()))),
        "get_attn_backend_cls": (NF4, type(current_platform).__dict__.get("get_attn_backend_cls")),
        "nf4 accepted": (NF4, registration.nf4_is_accepted()),
        "Scheduler.__init__": (TTL, Scheduler.__dict__["__init__"]),
        "Scheduler.add_request": (TTL, Scheduler.__dict__["add_request"]),
        "Scheduler.make_stats": (TTL, Scheduler.__dict__["make_stats"]),
        "InputProcessor._validate_params": (SETTINGS, InputProcessor.__dict__["_validate_params"]),
        "StatLoggerManager.__init__": (TTL, StatLoggerManager.__dict__["__init__"]),
        "ttl.engine flags": (TTL, (engine.SCHEDULER_HOOKED, engine.REQUESTS_HOOKED, engine.STATS_HOOKED)),
    }


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class Injected(RuntimeError):
    pass


def counting(original: Any, fail_at: int | None, seen: list[str], feature: list[str]) -> Any:
    """``original`` that counts the changes made and raises at change ``fail_at``."""

    def change(*args: Any, **kwargs: Any) -> Any:
        seen.append(feature[0])
        if len(seen) == fail_at:
            raise Injected(f"injected at change {fail_at}")
        return original(*args, **kwargs)

    return change


def register_once(fail_at: int | None = None, inject: Any = None) -> dict[str, Any]:
    """Reset vLLM, install the fault, call register(); what happened."""
    journal.undo_to(0)
    plugin._REGISTERED = False
    seen: list[str] = []
    current = [""]
    originals = {name: getattr(journal, name) for name in ("replace", "set_item", "on_undo")}
    features = plugin.FEATURES

    def tracked(name: str, step: Any) -> Any:
        def run() -> None:
            current[0] = name
            step()

        return run

    plugin.FEATURES = tuple((name, tracked(name, step)) for name, step in features)
    for name, original in originals.items():
        setattr(journal, name, counting(original, fail_at, seen, current))
    restore = inject() if inject else None
    errors = Errors()
    logging.getLogger("vllm.nf4kv").addHandler(errors)
    raised = None
    try:
        plugin.register()
    except BaseException as error:  # noqa: BLE001 (that is what we look for)
        raised = f"{type(error).__name__}: {error}"
    finally:
        logging.getLogger("vllm.nf4kv").removeHandler(errors)
        for name, original in originals.items():
            setattr(journal, name, original)
        plugin.FEATURES = features
        if restore:
            restore()
    return {"raised": raised, "errors": errors.messages, "changes": seen, "state": snapshot()}


def auto_config_builds(model_dir: str) -> bool:
    from vllm.engine.arg_utils import EngineArgs

    EngineArgs(model=model_dir, kv_cache_dtype="auto", enforce_eager=True).create_engine_config()
    return True


def ttl_refusals(model_dir: str) -> dict[str, str | None]:
    """What a server TTL and a request TTL get now: the error, or None where they are taken."""
    from types import SimpleNamespace

    from vllm.engine.arg_utils import EngineArgs

    from vllm_nf4kv.ttl import engine

    refusals: dict[str, str | None] = {}
    args = EngineArgs(
        model=model_dir, enforce_eager=True, additional_config={"nf4kv": {"prefix_cache_ttl_s": 60}}
    )
    try:
        args.create_engine_config()
        refusals["server"] = None
    except ValueError as error:
        refusals["server"] = str(error)
    processor = SimpleNamespace(vllm_config=SimpleNamespace(additional_config={}))
    try:
        engine.check_request_ttl(processor, 5)
        refusals["request"] = None
    except ValueError as error:
        refusals["request"] = str(error)
    return refusals


def pre_034_ownership(block: Any, pool: Any) -> bool:
    """The TTL pool's ownership test before vLLM 0.34 (``block.pool`` is the pool itself).

    On 0.34, where ``block.pool`` is a weakref, it never matches: released blocks are
    never tracked (the bug the self-check exists for). Elsewhere it is the real test.
    """
    owner = getattr(block, "pool", None)
    return owner is None or owner is pool


def never_owned(block: Any, pool: Any) -> bool:
    return False


def _same(a: Any, b: Any) -> bool:
    return a is b or (not callable(a) and not isinstance(a, classmethod) and a == b)


def differences(state: dict, failed: set[str], before: dict, after: dict) -> list[str]:
    """Attributes not as they should be.

    A failed feature's attributes must be exactly as before registration. The
    others must be installed: a value such as a dtype table entry equal to a
    clean registration's, a wrapper (a new closure each time) not vLLM's own.
    """
    wrong = []
    for key, (feature, value) in state.items():
        old, clean = before[key][1], after[key][1]
        if feature in failed:
            ok = _same(value, old)
        elif callable(clean) or isinstance(clean, classmethod):
            ok = _same(value, old) if _same(clean, old) else not _same(value, old)
        else:
            ok = _same(value, clean)
        if not ok:
            wrong.append(key)
    return wrong


def raising(error: Exception) -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    return fail


def replace(owner: Any, name: str, value: Any) -> Any:
    """An injection: ``owner.name`` is ``value`` while register() runs."""

    def inject() -> Any:
        saved = getattr(owner, name)
        setattr(owner, name, value)
        return lambda: setattr(owner, name, saved)

    return inject


def break_import(module: str) -> Any:
    """An injection: ``import module`` raises ImportError."""

    def inject() -> Any:
        saved = sys.modules.get(module)
        sys.modules[module] = None  # type: ignore[assignment]
        return lambda: sys.modules.__setitem__(module, saved) if saved else sys.modules.pop(module, None)

    return inject


def block_pool_is_weak() -> bool:
    """Whether this vLLM's blocks name their pool through a weakref (0.34)."""
    import weakref

    from vllm.v1.core.block_pool import BlockPool

    pool = BlockPool(num_gpu_blocks=2, enable_caching=True, hash_block_size=4)
    return isinstance(pool.blocks[0].pool, weakref.ReferenceType)


def main() -> None:
    import cuda_wheel_on_cpu  # beside this script

    cuda_wheel_on_cpu.allow_config_level()
    model_dir = sys.argv[1]
    before = snapshot()
    clean = register_once()
    after = clean["state"]
    cases = []
    for k, feature in enumerate(clean["changes"], start=1):
        cases.append((f"change {k}", {feature}, {"fail_at": k}))
    others = {
        "check_vllm_features raises AttributeError": (
            {NF4},
            {"inject": replace(registration, "check_vllm_features", raising(AttributeError("no such API")))},
        ),
        "vllm.v1.kv_cache_interface import fails": (
            {NF4},
            {"inject": break_import("vllm.v1.kv_cache_interface")},
        ),
        "nf4 still refused after patching": (
            {NF4},
            {"inject": replace(registration, "nf4_is_accepted", lambda: False)},
        ),
        "ttl.frontend import fails": ({TTL}, {"inject": break_import("vllm_nf4kv.ttl.frontend")}),
        "SchedulerStats import fails": ({TTL}, {"inject": break_import("vllm.v1.metrics.stats")}),
        "settings import fails": ({SETTINGS}, {"inject": break_import("vllm_nf4kv.settings")}),
        "nf4 routed to vLLM's own kernels (self-check)": (
            {NF4},
            {"inject": replace(selection, "select_nf4_backend", lambda *args: "vllm.CPUAttentionBackend")},
        ),
        "nf4 pages sized as vLLM's (self-check)": (
            {NF4},
            {"inject": replace(common, "nf4_spec", lambda spec: spec)},
        ),
        "TTL pool tracks no released block (self-check)": (
            {TTL},
            {"inject": replace(ttl_pool, "owned_by", never_owned)},
        ),
    }
    for name, (failed, kwargs) in others.items():
        cases.append((name, failed, kwargs))
    results = []
    for name, failed, kwargs in cases:
        outcome = register_once(**kwargs)
        results.append(
            {
                "case": name,
                "failed_feature": sorted(failed),
                "raised": outcome["raised"],
                "errors": outcome["errors"],
                "wrong": differences(outcome["state"], failed, before, after),
                "auto_config_builds": auto_config_builds(model_dir),
                "ttl_refusals": ttl_refusals(model_dir),
            }
        )
    ownership = register_once(inject=replace(ttl_pool, "owned_by", pre_034_ownership))
    ownership = {"errors": ownership["errors"], "ttl_refusals": ttl_refusals(model_dir)}
    journal.undo_to(0)
    pristine = differences(snapshot(), {SETTINGS, NF4, TTL}, before, after)
    print(
        RESULT_MARK
        + json.dumps(
            {
                "clean_changes": len(clean["changes"]),
                "clean_errors": clean["errors"],
                "clean_nf4_accepted": after["nf4 accepted"][1],
                "undone_all_wrong": pristine,
                "cases": results,
                "pre_034_ownership": ownership,
                "block_pool_is_weak": block_pool_is_weak(),
            }
        )
    )


if __name__ == "__main__":
    main()
