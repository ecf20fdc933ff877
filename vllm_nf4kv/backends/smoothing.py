"""The key smoothing an nf4 attention layer applies, found once per engine (both backends).

The impl is built inside vLLM's ``Attention.__init__`` without its layer's name, so the
engine's calibration is resolved (and a wrong file refused) in ``__init__``, at startup,
and each layer's own ``d`` is looked up by ``layer.layer_name`` on its first call.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_nf4kv.calibration import Calibration, KeySmoother, local_heads, resolve

logger = logging.getLogger("vllm.nf4kv")

_LOGGED: set[str] = set()


def layer_smoothing(num_heads: int, num_kv_heads: int, head_size: int) -> LayerSmoothing:
    """The smoothing of the layer being built (``get_current_vllm_config``): checked, logged once."""
    from vllm.config import get_current_vllm_config

    try:
        model_config = get_current_vllm_config().model_config
    except AssertionError:  # no engine is being built (vLLM 0.32 asserts)
        model_config = None
    if model_config is None:  # an impl built outside an engine (the backend tests): nothing to serve
        return LayerSmoothing(None, num_heads, num_kv_heads, num_kv_heads, head_size)
    config = get_current_vllm_config()
    resolved = resolve(getattr(config, "additional_config", None), model_config.hf_text_config)
    if resolved.reason not in _LOGGED:
        _LOGGED.add(resolved.reason)
        logger.info("nf4 KV cache: %s", resolved.reason)
    total = model_config.get_total_num_kv_heads()
    return LayerSmoothing(resolved.calibration, num_heads, num_kv_heads, total, head_size)


def _tensor_parallel() -> tuple[int, int]:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (AssertionError, RuntimeError, ImportError):  # no parallel state: one process
        return 0, 1


class LayerSmoothing:
    """One impl's smoothing: looked up on its first call, then a :class:`KeySmoother` or None."""

    def __init__(
        self,
        calibration: Calibration | None,
        num_heads: int,
        num_kv_heads: int,
        total_kv_heads: int,
        head_size: int,
    ) -> None:
        self.calibration = calibration
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.total_kv_heads = total_kv_heads
        self._smoother: KeySmoother | None = None
        self._resolved = calibration is None

    def for_layer(self, layer: Any) -> KeySmoother | None:
        if self._resolved:
            return self._smoother
        assert self.calibration is not None
        entry = self.calibration.layer(layer.layer_name, self.total_kv_heads, self.head_size)
        rank, size = _tensor_parallel()
        heads = local_heads(self.num_kv_heads, self.total_kv_heads, rank, size)
        scale = entry.key_scale[heads]
        # a layer calibrate left unsmoothed (d = 1) costs nothing: x * 1.0 is x, so skipping is exact
        self._smoother = None if bool((scale == 1).all()) else KeySmoother(scale, self.num_heads)
        self._resolved = True
        return self._smoother
