"""The API-server side of the TTL metrics: a vLLM stat logger that goes first.

``vllm_nf4kv.patches`` puts one :class:`TTLStatLogger` at the head of each
``StatLoggerManager.stat_loggers``, so its :meth:`~TTLStatLogger.record` takes
the ``nf4kv:`` payload out of ``SchedulerStats.num_kv_fetch_reqs_by_stage``
before vLLM's own loggers read that dict (see :mod:`vllm_nf4kv.ttl.metrics`).
"""

from __future__ import annotations

from typing import Any

from vllm.v1.metrics.loggers import AggregateStatLoggerBase

from vllm_nf4kv.ttl.metrics import PrometheusTTLMetrics, pop_payload


class TTLStatLogger(AggregateStatLoggerBase):
    """Records the engine cores' TTL payload on the ``nf4kv:`` Prometheus metrics."""

    def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
        self.engine_indexes = engine_indexes or [0]
        self.model_name = str(vllm_config.model_config.served_model_name)
        self.metrics = PrometheusTTLMetrics.get()

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is None:
            return
        payload = pop_payload(getattr(scheduler_stats, "num_kv_fetch_reqs_by_stage", None))
        if payload:
            self.metrics.record(payload, self.model_name, engine_idx or 0)

    def log_engine_initialized(self) -> None:
        pass
