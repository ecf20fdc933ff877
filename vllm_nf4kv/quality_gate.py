"""Never serve nf4 on a model it would damage without saying so: the two refusals at startup.

* With a calibration file, :func:`vllm_nf4kv.calibration.quality_refusal`: the file holds each
  layer's attention error measured by ``vllm-nf4kv calibrate`` with what is served; a layer
  above ``MAX_ATTENTION_ERROR`` stops the engine while its attention layers are built.
* Without one, :func:`check_loaded_model`, once the weights are loaded: a model whose
  projections add a bias to its keys (the Qwen2 family) loses far more than fp8 would with
  uncalibrated nf4 (Qwen2.5-Coder-0.5B: +173% perplexity on Moby Dick through vLLM,
  docs/results/vllm-cpu-qwen.md), and only the offsets ``vllm-nf4kv calibrate`` measures fix
  that (docs/format.md, "Quality gate").

Both are waived by ``accept_quality_risk`` (settings.py).
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_nf4kv.calibration import CALIBRATE_COMMAND, WORST_LAYERS_SHOWN, accept_hint


def key_bias(module: Any) -> torch.Tensor | None:
    """The key part of an attention module's projection bias (vLLM's fused ``qkv_proj`` or ``k_proj``)."""
    qkv = getattr(module, "qkv_proj", None)
    if qkv is not None and getattr(qkv, "bias", None) is not None:
        q_size = int(qkv.num_heads) * int(qkv.head_size)
        kv_size = int(qkv.num_kv_heads) * int(qkv.head_size)
        return qkv.bias.detach()[q_size : q_size + kv_size]
    k_proj = getattr(module, "k_proj", None)
    if k_proj is not None and getattr(k_proj, "bias", None) is not None:
        return k_proj.bias.detach()
    return None


def uncalibrated_biased_layers(model: torch.nn.Module) -> list[tuple[str, float]]:
    """``(layer name, max |key bias|)`` of the nf4 attention layers served without calibration."""
    found = []
    for module in model.modules():
        attn = getattr(module, "attn", None)
        smoothing = getattr(getattr(attn, "impl", None), "smoothing", None)
        if smoothing is None or smoothing.calibration is not None or smoothing.accept_risk:
            continue
        bias = key_bias(module)
        if bias is not None and bias.numel() and bool(bias.ne(0).any()):
            found.append((str(attn.layer_name), float(bias.float().abs().max())))
    return found


def check_loaded_model(model: torch.nn.Module) -> None:
    """Refuse an uncalibrated nf4 model with key biases (ValueError naming the worst layers)."""
    found = uncalibrated_biased_layers(model)
    if not found:
        return
    worst = sorted(found, key=lambda item: -item[1])[:WORST_LAYERS_SHOWN]
    shown = ", ".join(f"{name} max |b| {size:.3g}" for name, size in worst)
    raise ValueError(
        f"nf4 KV cache refused: this model adds a bias to its keys in {len(found)} attention layers "
        f"({shown}) and no calibration is loaded; uncalibrated nf4 damages such models. Run "
        f"`{CALIBRATE_COMMAND} MODEL` once (it measures the key and value offsets nf4 needs and "
        f"checks the error), or serve with --kv-cache-dtype auto or fp8, or accept the loss "
        f"knowingly with {accept_hint()}"
    )
