"""Where the prefix-cache TTL comes from, and what counts as a valid one.

Two sources, the first one set wins:

1. ``--additional-config '{"nf4kv": {"prefix_cache_ttl_s": 600}}'``
   (``vllm_config.additional_config["nf4kv"]["prefix_cache_ttl_s"]``);
2. the environment variable ``NF4KV_PREFIX_CACHE_TTL_S`` (not ``VLLM_*``: vLLM
   warns about ``VLLM_*`` names it does not know).

Unset (or JSON ``null``, or an empty variable) means *off*. A value is seconds:
a finite number ``>= 0`` (``0``: a released block is never a hit again), or
``inf`` (the same as off). Negative, NaN, booleans and anything that is not a
number are refused with a :class:`ValueError` that names the source and the fix.

This module imports nothing from vLLM.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CONFIG_NAMESPACE = "nf4kv"
CONFIG_KEY = "prefix_cache_ttl_s"
ENV_VAR = "NF4KV_PREFIX_CACHE_TTL_S"


@dataclass(frozen=True)
class TTLSetting:
    """The resolved TTL: ``ttl_s`` is None when the policy is off."""

    ttl_s: float | None
    source: str  # where it came from, for logs and errors

    @property
    def enabled(self) -> bool:
        return self.ttl_s is not None


CLI_SOURCE = f"--additional-config {CONFIG_NAMESPACE}.{CONFIG_KEY}"
CLI_EXAMPLE = f'--additional-config \'{{"{CONFIG_NAMESPACE}": {{"{CONFIG_KEY}": 600}}}}\''
ENV_EXAMPLE = f"{ENV_VAR}=600"


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


def resolve_ttl(additional_config: Any, environ: Mapping[str, str] | None = None) -> TTLSetting:
    """The TTL for one engine: ``additional_config`` first, then the environment.

    ``additional_config`` is ``vllm_config.additional_config`` (a dict, or an
    object vLLM lets plugins put there: anything but a mapping has no TTL).
    """
    environ = os.environ if environ is None else environ
    section = None
    if isinstance(additional_config, Mapping):
        section = additional_config.get(CONFIG_NAMESPACE)
    if section is not None and not isinstance(section, Mapping):
        raise ValueError(
            f"--additional-config: {CONFIG_NAMESPACE!r} must be a JSON object such as "
            f'{{"{CONFIG_NAMESPACE}": {{"{CONFIG_KEY}": 600}}}}, got {section!r}'
        )
    if section is not None and section.get(CONFIG_KEY) is not None:
        return TTLSetting(parse_ttl(section[CONFIG_KEY], CLI_SOURCE, CLI_EXAMPLE), CLI_SOURCE)
    raw = environ.get(ENV_VAR)
    if raw is not None and raw.strip():
        return TTLSetting(parse_ttl(raw, ENV_VAR, ENV_EXAMPLE), ENV_VAR)
    return TTLSetting(None, "default (off)")
