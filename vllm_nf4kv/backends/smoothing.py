"""The calibration an nf4 attention layer applies, found once per engine (both backends).

The impl is built inside vLLM's ``Attention.__init__`` without its layer's name, so the
engine's calibration is resolved (a wrong file, or one over the quality bound, refused) in
``__init__``, at startup, and each layer's own transform is looked up by ``layer.layer_name``
once the model is loaded (:func:`resolve_model_layers`, from ``patches``): a file without
this model's layer names (another vLLM's naming, a multimodal prefix, draft-model layers)
stops startup instead of the first request.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_nf4kv.backends.common import current_model_config
from vllm_nf4kv.calibration import Calibration, resolve
from vllm_nf4kv.kv_transform import KVTransform, local_heads

logger = logging.getLogger("vllm.nf4kv")

_LOGGED: set[str] = set()


def layer_smoothing(num_heads: int, num_kv_heads: int, head_size: int) -> LayerSmoothing:
    """The calibration of the layer being built (``get_current_vllm_config``): checked, logged once."""
    from vllm.config import get_current_vllm_config

    model_config = current_model_config()
    if model_config is None:  # an impl built outside an engine (the backend tests): nothing to serve
        return LayerSmoothing(None, num_heads, num_kv_heads, num_kv_heads, head_size)
    config = get_current_vllm_config()
    additional_config = getattr(config, "additional_config", None)
    resolved = resolve(additional_config, model_config.hf_text_config, model_config.max_model_len)
    if resolved.reason not in _LOGGED:
        _LOGGED.add(resolved.reason)
        logger.info("nf4 KV cache: %s", resolved.reason)
    total = model_config.get_total_num_kv_heads()
    return LayerSmoothing(
        resolved.calibration, num_heads, num_kv_heads, total, head_size, resolved.accept_risk
    )


def _tensor_parallel() -> tuple[int, int]:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (AssertionError, RuntimeError, ImportError):  # no parallel state: one process
        return 0, 1


class LayerSmoothing:
    """One impl's calibration: looked up on its first call, then a :class:`KVTransform` or None."""

    def __init__(
        self,
        calibration: Calibration | None,
        num_heads: int,
        num_kv_heads: int,
        total_kv_heads: int,
        head_size: int,
        accept_risk: bool = False,
    ) -> None:
        self.calibration = calibration
        self.accept_risk = accept_risk  # the quality gate is waived (quality_gate)
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.total_kv_heads = total_kv_heads
        self._transform: KVTransform | None = None
        self._resolved = calibration is None

    def for_layer(self, layer: Any) -> KVTransform | None:
        if self._resolved:
            return self._transform
        assert self.calibration is not None
        entry = self.calibration.layer(layer.layer_name, self.total_kv_heads, self.head_size)
        rank, size = _tensor_parallel()
        heads = local_heads(self.num_kv_heads, self.total_kv_heads, rank, size)
        transform = KVTransform(
            entry.key_scale[heads], entry.key_offset[heads], entry.value_offset[heads], self.num_heads
        )
        # a layer calibrate left as it was (d = 1, no offsets) costs nothing: skipping is exact
        self._transform = None if transform.is_identity else transform
        self._resolved = True
        return self._transform


def resolve_model_layers(model: Any) -> int:
    """Look up every nf4 attention layer's transform now and put it on the model's device;
    returns how many layers are nf4.

    Raises the calibration's ``ValueError`` (the missing layer, the file, the command that
    makes the right one) for the first layer the file does not cover. On the device from
    here on, the tables cost no copy in any forward (CUDA graphs capture none).
    """
    device = next((parameter.device for parameter in model.parameters()), None)
    count = 0
    for module in model.modules():
        smoothing = getattr(getattr(module, "impl", None), "smoothing", None)
        if isinstance(smoothing, LayerSmoothing):
            transform = smoothing.for_layer(module)
            if transform is not None and device is not None:
                transform.move_to(device)
            count += 1
    return count
