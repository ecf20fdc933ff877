"""``vllm-nf4kv stats``: the prefix cache's statistics, read from a running server.

Fetches ``/metrics`` of a ``vllm serve`` (with this plugin loaded) and prints
hits, misses and hit rate (vLLM's ``vllm:prefix_cache_queries`` and
``vllm:prefix_cache_hits``, in tokens, since the server started), the
prefix-cache TTL, blocks expired by it (by the server-wide TTL and by TTLs that
requests set for themselves) and blocks cached now (this plugin's
``nf4kv:*`` metrics, see docs/ttl.md), and the KV-cache memory against what the
same capacity would take in bf16. Figures are summed over engines.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from vllm_nf4kv.ttl.metrics import (
    CAUSE_REQUEST,
    CAUSE_SERVER,
    EXPIRY_CAUSES,
    METRIC_CACHED,
    METRIC_EXPIRED,
    METRIC_KV_BF16_BYTES,
    METRIC_KV_BYTES,
    METRIC_TTL,
    METRIC_VLLM_HITS,
    METRIC_VLLM_QUERIES,
)

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """Samples ``(name, labels, value)`` of a Prometheus text exposition."""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        yield name, dict(_LABEL.findall(labels or "")), number


def metric_totals(text: str) -> dict[str, float]:
    """Each metric of a Prometheus text exposition, its samples summed over their labels (engines...)."""
    sums: dict[str, float] = {}
    for name, _labels, value in parse_metrics(text):
        sums[name] = sums.get(name, 0.0) + value
    return sums


@dataclass
class CacheStats:
    url: str
    queries: float  # tokens looked up in the prefix cache
    hits: float  # tokens found there
    ttl_s: float | None  # None: off; missing metrics also read as None
    expired_blocks: float | None
    cached_blocks: float | None
    kv_cache_bytes: float | None
    kv_cache_bf16_bytes: float | None
    cache_dtype: str | None
    # expired blocks by cause (metrics.EXPIRY_CAUSES: server_ttl, request_ttl)
    expired_by_cause: dict[str, float] = field(default_factory=dict)

    @property
    def misses(self) -> float:
        return self.queries - self.hits

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.queries if self.queries else None

    @property
    def kv_saved_bytes(self) -> float | None:
        if self.kv_cache_bytes is None or self.kv_cache_bf16_bytes is None:
            return None
        return self.kv_cache_bf16_bytes - self.kv_cache_bytes

    def as_dict(self) -> dict:
        data = asdict(self)
        data.update(misses=self.misses, hit_rate=self.hit_rate, kv_saved_bytes=self.kv_saved_bytes)
        return data


def collect(text: str, url: str = "") -> CacheStats:
    """Sum the samples this view needs over every engine and model."""
    sums: dict[str, float] = {}
    seen: set[str] = set()
    ttl: float | None = None
    cache_dtype = None
    by_cause = dict.fromkeys(EXPIRY_CAUSES, 0.0)
    for name, labels, value in parse_metrics(text):
        if name == f"{METRIC_EXPIRED}_total" and labels.get("cause") in by_cause:
            by_cause[labels["cause"]] += value
        if name == METRIC_TTL:
            seen.add(name)
            ttl = value if ttl is None else min(ttl, value)
        elif name == "vllm:cache_config_info":
            cache_dtype = labels.get("cache_dtype", cache_dtype)
        else:
            sums[name] = sums.get(name, 0.0) + value
            seen.add(name)

    def total(name: str) -> float | None:
        return sums.get(name) if name in seen else None

    return CacheStats(
        url=url,
        queries=sums.get(f"{METRIC_VLLM_QUERIES}_total", 0.0),
        hits=sums.get(f"{METRIC_VLLM_HITS}_total", 0.0),
        ttl_s=None if ttl is None or math.isinf(ttl) else ttl,
        expired_blocks=total(f"{METRIC_EXPIRED}_total"),
        cached_blocks=total(METRIC_CACHED),
        kv_cache_bytes=total(METRIC_KV_BYTES),
        kv_cache_bf16_bytes=total(METRIC_KV_BF16_BYTES),
        cache_dtype=cache_dtype,
        expired_by_cause=by_cause if f"{METRIC_EXPIRED}_total" in seen else {},
    )


def metrics_url(url: str) -> str:
    url = url.rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    return url if url.endswith("/metrics") else f"{url}/metrics"


def fetch(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (operator-given URL)
        return response.read().decode("utf-8", "replace")


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def render(stats: CacheStats) -> str:
    """The statistics view, as ``vllm-nf4kv stats`` prints it."""
    hit_rate = "n/a (no queries yet)" if stats.hit_rate is None else f"{100 * stats.hit_rate:.1f}%"
    if stats.expired_blocks is None and stats.kv_cache_bytes is None:
        ttl = expired = cached = "n/a (no nf4kv metrics: no TTL and no nf4 cache, or no vllm-nf4kv plugin)"
    elif stats.expired_blocks is None:  # an nf4 cache without a TTL: vLLM's own block pool
        ttl, expired, cached = "off", "none (no TTL)", "n/a (counted only with a TTL)"
    else:
        ttl = "off" if stats.ttl_s is None else f"{stats.ttl_s:g} s"
        causes = stats.expired_by_cause
        expired = (
            f"{stats.expired_blocks:,.0f} blocks (server TTL {causes.get(CAUSE_SERVER, 0):,.0f}, "
            f"request TTLs {causes.get(CAUSE_REQUEST, 0):,.0f})"
        )
        cached = f"{stats.cached_blocks:,.0f}" if stats.cached_blocks is not None else "n/a"
    lines = [
        f"Prefix cache  {stats.url}",
        f"  hits           {stats.hits:,.0f} tokens",
        f"  misses         {stats.misses:,.0f} tokens",
        f"  hit rate       {hit_rate}",
        f"  TTL            {ttl}",
        f"  expirations    {expired}",
        f"  cached blocks  {cached}",
        f"KV cache  (dtype {stats.cache_dtype or 'unknown'})",
    ]
    saved = stats.kv_saved_bytes
    if saved is None or not stats.kv_cache_bf16_bytes:
        lines.append("  memory         n/a")
    else:
        fraction = saved / stats.kv_cache_bf16_bytes
        lines += [
            f"  memory         {_mib(stats.kv_cache_bytes or 0)}",
            f"  as bf16        {_mib(stats.kv_cache_bf16_bytes)} for the same tokens",
            f"  saved vs bf16  {_mib(saved)} ({100 * fraction:.1f}%)",
        ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    url = metrics_url(args.url)
    try:
        text = fetch(url, args.timeout)
    except (urllib.error.URLError, OSError, ValueError) as error:
        print(f"vllm-nf4kv stats: cannot read {url}: {error}", file=sys.stderr)
        return 1
    stats = collect(text, url)
    print(json.dumps(stats.as_dict(), indent=2) if args.json else render(stats))
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "stats",
        help="prefix-cache statistics of a running vllm serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the server (or its /metrics URL); default %(default)s"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for /metrics")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.set_defaults(func=main)
