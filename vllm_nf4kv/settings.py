"""Every setting vllm-nf4kv reads, in one table, and the refusal of anything else.

vLLM passes ``--additional-config`` through untouched and lets any environment
variable outside ``VLLM_*`` pass silently, so a typo (``prefix_cache_ttl`` for
``prefix_cache_ttl_s``) would leave a feature silently off. Here the
``nf4kv`` section and the ``NF4KV_*`` variables are checked against
:data:`SETTINGS` at startup; an unknown name is refused with the known names
and the closest match. Each feature still parses its own values
(:mod:`vllm_nf4kv.ttl.config` for the TTLs).

docs/configuration.md is the table for users; a test keeps it equal to this one.
This module imports nothing from vLLM.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

NAMESPACE = "nf4kv"  # --additional-config '{"nf4kv": {...}}'
ENV_PREFIX = "NF4KV_"


@dataclass(frozen=True)
class Setting:
    """One setting: its key in the ``nf4kv`` section (None: environment only) and variable."""

    key: str | None
    env_var: str
    values: str
    default: str
    meaning: str


PREFIX_CACHE_TTL = Setting(
    "prefix_cache_ttl_s",
    "NF4KV_PREFIX_CACHE_TTL_S",
    "seconds >= 0, or `inf`",
    "unset: off",
    "Server-wide prefix-cache TTL: a cached block unused for longer is no longer a prefix hit "
    "(docs/ttl.md)",
)
MAX_REQUEST_TTL = Setting(
    "max_request_ttl_s",
    "NF4KV_MAX_REQUEST_TTL_S",
    "seconds >= 0, or `inf`",
    "unset: no maximum",
    "The largest `vllm_xargs.nf4kv_prefix_ttl_s` a request may ask for (HTTP 400 above it)",
)
CALIBRATION = Setting(
    "calibration",
    "NF4KV_CALIBRATION",
    "a file from `vllm-nf4kv calibrate`, or `none`",
    "the model's file in `~/.cache/vllm-nf4kv/calibration/` if there is one, else none",
    "Per-model key and value offsets and key smoothing for `--kv-cache-dtype nf4` "
    "([format.md](format.md#calibration)); a file made for another model is refused at startup",
)
ACCEPT_QUALITY_RISK = Setting(
    "accept_quality_risk",
    "NF4KV_ACCEPT_QUALITY_RISK",
    "`true` / `false` (variable: `1` / `0`)",
    "`false`",
    "Serve `--kv-cache-dtype nf4` even where it is measured or known to damage the model (the "
    "quality gate's refusal, [format.md](format.md#quality-gate)); for experiments only",
)
CPU_KERNELS = Setting(
    None,
    "NF4KV_CPU_KERNELS",
    "`1` or `0`",
    "`1`",
    "`0`: the PyTorch path instead of the C++ CPU kernels (same bytes, slower; for comparisons)",
)
SETTINGS: tuple[Setting, ...] = (
    PREFIX_CACHE_TTL, MAX_REQUEST_TTL, CALIBRATION, ACCEPT_QUALITY_RISK, CPU_KERNELS
)


# What a request may set in ``vllm_xargs`` (vLLM's ``SamplingParams.extra_args``); any other
# key with this prefix is refused with HTTP 400 (``patches.validate_request_args``).
REQUEST_PREFIX = "nf4kv_"
REQUEST_TTL_KEY = "nf4kv_prefix_ttl_s"  # docs/ttl.md "Request TTLs"
REQUEST_KEYS: tuple[str, ...] = (REQUEST_TTL_KEY,)


def _unknown(where: str, name: str, known: list[str], what: str = "setting") -> ValueError:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    suggestion = f"did you mean {close[0]!r}? " if close else ""
    return ValueError(
        f"{where} {name!r} is not a vllm-nf4kv {what}; {suggestion}"
        f"known: {', '.join(known)} (docs/configuration.md)"
    )


def unknown_request_key(extra_args: Mapping[str, Any]) -> tuple[str, ValueError] | None:
    """The first ``nf4kv_*`` key of a request's ``vllm_xargs`` that is not one of ours, and why.

    vLLM passes ``vllm_xargs`` through unchecked, so a typo (``nf4kv_prefix_tl_s``) would
    leave the request's setting silently off, as an unknown server setting would.
    """
    for key in extra_args:
        if isinstance(key, str) and key.lower().startswith(REQUEST_PREFIX) and key not in REQUEST_KEYS:
            return key, _unknown("vllm_xargs key", key, list(REQUEST_KEYS), what="request key")
    return None


def nf4kv_section(additional_config: Any) -> Mapping[str, Any]:
    """The ``nf4kv`` section of ``additional_config``, checked; empty when there is none.

    ``additional_config`` is ``vllm_config.additional_config`` (a dict, or an
    object vLLM lets plugins put there: anything but a mapping has no section).
    """
    section = additional_config.get(NAMESPACE) if isinstance(additional_config, Mapping) else None
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ValueError(
            f"--additional-config: {NAMESPACE!r} must be a JSON object such as "
            f'{{"{NAMESPACE}": {{"{PREFIX_CACHE_TTL.key}": 600}}}}, got {section!r}'
        )
    known = [setting.key for setting in SETTINGS if setting.key is not None]
    for key in section:
        if key not in known:
            raise _unknown(f"--additional-config {NAMESPACE!r} key", str(key), known)
    return section


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Refuse ``NF4KV_*`` variables this plugin does not read, and a bad ``NF4KV_CPU_KERNELS``."""
    environ = os.environ if environ is None else environ
    known = [setting.env_var for setting in SETTINGS]
    for name in environ:
        if name.startswith(ENV_PREFIX) and name not in known:
            raise _unknown("environment variable", name, known)
    value = environ.get(CPU_KERNELS.env_var)
    if value is not None and value.strip() not in ("", "0", "1"):
        raise ValueError(
            f"{CPU_KERNELS.env_var}={value!r}: give 1 (the C++ CPU kernels, the default) or 0 "
            f"(the PyTorch path), or unset it"
        )


def check_settings(additional_config: Any, environ: Mapping[str, str] | None = None) -> None:
    """Everything :func:`nf4kv_section` and :func:`check_environment` refuse, at once."""
    nf4kv_section(additional_config)
    check_environment(environ)
