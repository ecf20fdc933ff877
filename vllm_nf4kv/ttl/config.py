"""Where the prefix-cache TTLs come from, and what counts as a valid one.

Server settings (rows of :data:`vllm_nf4kv.settings.SETTINGS`), each from two
sources, the first one set wins:

1. ``--additional-config '{"nf4kv": {"prefix_cache_ttl_s": 600, "max_request_ttl_s": 3600}}'``
   (``vllm_config.additional_config["nf4kv"][...]``);
2. the environment variables ``NF4KV_PREFIX_CACHE_TTL_S`` and
   ``NF4KV_MAX_REQUEST_TTL_S`` (not ``VLLM_*``: vLLM warns about ``VLLM_*``
   names it does not know).

Unset (or JSON ``null``, or an empty variable) means *off* / *no maximum*. A
value is seconds: a finite number ``>= 0`` (``0``: a released block is never a
hit again), or ``inf`` (the same as unset). Negative, NaN, booleans and
anything that is not a number are refused with a :class:`ValueError` that
names the source and the fix.

A request sets its own TTL with ``{"vllm_xargs": {"nf4kv_prefix_ttl_s": 60}}``
(``SamplingParams.extra_args``): seconds as a finite number ``>= 0`` or a
string such as ``"60"``, ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``, at most
the server's ``max_request_ttl_s``; :func:`parse_request_ttl` says why
anything else is refused (the API server answers HTTP 400 with that text).

This module imports nothing from vLLM.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_nf4kv.settings import MAX_REQUEST_TTL, NAMESPACE, PREFIX_CACHE_TTL, REQUEST_TTL_KEY, nf4kv_section

CONFIG_NAMESPACE = NAMESPACE
CONFIG_KEY = PREFIX_CACHE_TTL.key
ENV_VAR = PREFIX_CACHE_TTL.env_var
MAX_REQUEST_KEY = MAX_REQUEST_TTL.key
MAX_REQUEST_ENV_VAR = MAX_REQUEST_TTL.env_var
REQUEST_KEY = REQUEST_TTL_KEY  # in a request's vllm_xargs (SamplingParams.extra_args)


@dataclass(frozen=True)
class TTLSetting:
    """The resolved server settings: ``ttl_s`` is None when the server-wide TTL is off."""

    ttl_s: float | None
    source: str  # where it came from, for logs and errors
    max_request_ttl_s: float | None = None  # the largest TTL a request may ask for; None: any

    @property
    def enabled(self) -> bool:
        return self.ttl_s is not None


def cli_example(key: str) -> str:
    """How to set ``key`` on the command line, for error messages."""
    return f'--additional-config \'{{"{CONFIG_NAMESPACE}": {{"{key}": 600}}}}\''


CLI_EXAMPLE = cli_example(CONFIG_KEY)


def parse_ttl(value: Any, source: str, example: str = CLI_EXAMPLE) -> float | None:
    """Seconds as a float, or None for off. Raises ValueError on bad input."""
    hint = f"give a number of seconds >= 0 (e.g. {example}), or unset it for no TTL"
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{source}: prefix-cache TTL must be a number of seconds, got {value!r}; {hint}")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            seconds = float(text)
        except ValueError:
            raise ValueError(
                f"{source}: prefix-cache TTL must be a number of seconds, got {value!r}; {hint}"
            ) from None
    elif isinstance(value, (int, float)):
        seconds = float(value)
    else:
        raise ValueError(
            f"{source}: prefix-cache TTL must be a number of seconds, "
            f"got {type(value).__name__} {value!r}; {hint}"
        )
    if math.isnan(seconds):
        raise ValueError(f"{source}: prefix-cache TTL must be a number of seconds, got NaN; {hint}")
    if seconds < 0:
        raise ValueError(f"{source}: prefix-cache TTL must be >= 0 seconds, got {value!r}; {hint}")
    if math.isinf(seconds):
        return None  # an infinite TTL never expires anything: the policy is off
    return seconds


def _setting(
    section: Mapping[str, Any], key: str, env_var: str, environ: Mapping[str, str]
) -> tuple[float | None, str]:
    """One setting in seconds from the config key, else the variable; and its source."""
    cli_source = f"--additional-config {CONFIG_NAMESPACE}.{key}"
    if section.get(key) is not None:
        return parse_ttl(section[key], cli_source, cli_example(key)), cli_source
    raw = environ.get(env_var)
    if raw is not None and raw.strip():
        return parse_ttl(raw, env_var, f"{env_var}=600"), env_var
    return None, "default (off)"


def resolve_ttl(additional_config: Any, environ: Mapping[str, str] | None = None) -> TTLSetting:
    """The TTL settings for one engine: ``additional_config`` first, then the environment.

    ``additional_config`` is ``vllm_config.additional_config`` (see
    :func:`vllm_nf4kv.settings.nf4kv_section`).
    """
    environ = os.environ if environ is None else environ
    section = nf4kv_section(additional_config)  # unknown keys refused there
    ttl_s, source = _setting(section, CONFIG_KEY, ENV_VAR, environ)
    max_request_ttl_s, _ = _setting(section, MAX_REQUEST_KEY, MAX_REQUEST_ENV_VAR, environ)
    return TTLSetting(ttl_s, source, max_request_ttl_s)


# -- a request's own TTL ------------------------------------------------------------

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {None: 1.0, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_request_ttl(value: Any, max_ttl_s: float | None = None) -> float | None:
    """A request's TTL in seconds, None when it sets none; ValueError says why not.

    The message is what the client reads in the HTTP 400 answer.
    """
    if value is None:
        return None
    where = f"vllm_xargs.{REQUEST_KEY}"
    hint = (
        'seconds as a number >= 0 (e.g. 60; 0: "never a prefix hit after this request"), '
        'or a string such as "500ms", "30s", "5m", "1h"'
    )
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where} must be {hint}; got {value!r}")
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"{where} must be {hint}; got {value!r}")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{where} must be {hint}; got {value!r}")
    if max_ttl_s is not None and seconds > max_ttl_s:
        raise ValueError(
            f"{where} is {value!r}, above this server's maximum of {max_ttl_s:g} s "
            f"({CONFIG_NAMESPACE}.{MAX_REQUEST_KEY}); ask for at most {max_ttl_s:g}"
        )
    return seconds
