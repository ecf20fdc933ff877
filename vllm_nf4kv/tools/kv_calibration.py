"""Static per-(layer, KV head) statistics behind the ablation's ``+options``.

Everything here is measured once on a calibration text (use a different text
from the one evaluated) and then fixed, as a cache would ship it: the same for
every block a query reads, so prefix-cache hits stay exact.

Key offsets (at most one per candidate):

* ``koff``: subtract the mean post-RoPE key ``c`` (over calibration windows)
  from every key and never add it back. ``q·(k - c) = q·k - q·c`` shifts all of
  one query's logits by the same amount, so softmax is unchanged (not valid
  with logit soft-capping). Caveat: for RoPE pairs that rotate by more than a
  fraction of a turn over the context, a post-RoPE mean depends on the
  positions it was measured over; beyond them it no longer centres the keys.
* ``kofflf``: ``koff`` restricted to the low-frequency RoPE pairs, those with
  ``inv_freq * max_position <= pi / 3``. For them ``|R(w p) m - m| <= |m|`` at
  every position ``p <= max_position``, so the offset never hurts however long
  the context (``max_position``: the model's ``max_position_embeddings`` unless
  ``--koff-max-pos`` says otherwise).
* ``kpre``: subtract ``R(p) m``, the RoPE-rotated mean *pre*-RoPE key, at each
  key's position ``p``, and add it back after dequantization. Exact at every
  position, but the attention kernel must add ``q·R(p) m`` to each logit
  (cos/sin of the key's position): an upper bound for what offsets can buy.

Channel weights: ``kqw`` (keys stored as ``k * d``, read as ``k_hat / d``, i.e. ``1/d`` folded
into the query; ``kqw8``: power 1/8) and ``vow`` (values weighted by the squared column norms of
``o_proj`` the same way). ``d`` is what servers store, computed by the same functions
(:func:`vllm_nf4kv.calibration_measure.key_smoothing` of the pair-averaged
``E[q^2]`` and ``E[(k - c)^2]``, ``c`` the static key offset of the candidate, if any), only the
statistics come from this model run instead of ``vllm-nf4kv calibrate``'s vLLM run.

RoPE conventions are Hugging Face Llama's (neox style: channel ``i`` pairs with
``i + r/2`` for the first ``r = head_dim * partial_rotary_factor`` channels, ``inv_freq`` from
the model's rotary embedding, no attention scaling). The ablation scores whole windows from
position 0 without a KV cache, so a key's position is its index in the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from vllm_nf4kv.calibration_measure import apply_rope as apply_vllm_rope
from vllm_nf4kv.calibration_measure import (
    centred_square,
    key_smoothing,
    pair_mean,
    rope_pair_channels,
    rope_pairs,
)
from vllm_nf4kv.tools.kv_formats import KVFormat

OPTIONS = ("koff", "kofflf", "kpre", "kqw", "kqw8", "vow")
KEY_WEIGHT_POWERS = {"kqw": 0.25, "kqw8": 0.125}  # d = (E[q^2] / E[k^2]) ** power
KEY_OFFSETS = ("koff", "kofflf", "kpre")  # at most one per candidate
DITHER = 1e-6  # relative size of the --repeats perturbation


@dataclass
class AblationStats:
    """Statistics of one calibration pass; per-layer tensors are ``[num_kv_heads, head_dim]`` fp32.

    Not :class:`vllm_nf4kv.calibration.Calibration` (the file servers load): the options here
    include ones no server applies (``koff``, ``kpre``, ``vow``), so they need raw statistics.
    """

    text: str
    tokens: int
    ctx: int
    rotary_dim: int  # channels RoPE turns, neox pairs (i, i + rotary_dim / 2)
    inv_freq: torch.Tensor | None  # [rotary_dim / 2] RoPE frequencies (None: not one plain RoPE)
    max_position: int  # the longest context the kofflf offsets must hold for
    key_mean: dict[int, torch.Tensor]  # post-RoPE E[k]
    key_pre_mean: dict[int, torch.Tensor]  # pre-RoPE E[k]
    key_sq: dict[int, torch.Tensor]  # E[k^2]
    query_sq: dict[int, torch.Tensor]  # E[q^2] over the query heads that read the KV head
    value_sq: dict[int, torch.Tensor]  # E[v^2]
    out_weight_sq: dict[int, torch.Tensor]  # sum of o_proj weight^2 over its output rows and query heads

    def low_frequency_pairs(self) -> torch.Tensor:
        """``[head_dim]`` bool: channels of the RoPE pairs that turn by at most pi/3 over max_position."""
        if self.inv_freq is None:
            raise ValueError("kofflf needs one plain RoPE (this model has none or several)")
        slow = self.inv_freq * self.max_position <= math.pi / 3
        return torch.cat([slow, slow])

    def key_offset(self, layer: int, kind: str, positions: torch.Tensor) -> torch.Tensor:
        """The offset subtracted from keys: ``[H, 1, D]`` (static) or ``[H, T, D]`` (``kpre``)."""
        if kind == "koff":
            return self.key_mean[layer][:, None, :]
        if kind == "kofflf":
            return (self.key_mean[layer] * self.low_frequency_pairs())[:, None, :]
        if kind == "kpre":
            if self.inv_freq is None:
                raise ValueError("kpre needs one plain RoPE (this model has none or several)")
            return apply_rope(self.key_pre_mean[layer][:, None, :], positions, self.inv_freq)
        raise ValueError(f"unknown key offset {kind!r}; expected one of {KEY_OFFSETS}")

    def key_weights(self, layer: int, offset: torch.Tensor | None, power: float) -> torch.Tensor:
        """``d`` for keys stored as ``(k - offset) * d``: the servers' formula on these statistics.

        ``key_smoothing`` of ``E[q^2]`` and ``E[(k - offset)^2]``, each averaged over its RoPE
        pair (a pair's energy does not change as RoPE turns it, so ``d`` holds at every position),
        as ``vllm-nf4kv calibrate`` computes it (``tools/calibrate.py``, ``best_smoothing``).
        """
        key_sq = self.key_sq[layer]
        if offset is not None:
            key_sq = centred_square(key_sq, self.key_mean[layer], offset)
        pairs = rope_pairs(key_sq.shape[-1], self.rotary_dim, True)
        return key_smoothing(pair_mean(self.query_sq[layer].double(), pairs), pair_mean(key_sq, pairs), power)

    def value_weights(self, layer: int) -> torch.Tensor:
        """``d = (|W_o column|^2 / E[v^2]) ** (1/4)``: the same argument for the error after o_proj."""
        ratio = self.out_weight_sq[layer] / self.value_sq[layer].clamp_min(1e-12)
        return _unit_geomean(ratio.clamp_min(1e-12) ** 0.25)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False):
    """Neox-style RoPE of ``x`` ``[..., T or 1, D]`` at ``positions`` ``[T]`` (HF Llama's convention).

    The servers' :func:`vllm_nf4kv.calibration_measure.apply_rope`, with the angles HF's
    ``inv_freq`` gives and the token axis where HF keeps it.
    """
    angles = positions.double()[:, None] * inv_freq.double()[None, :]  # [T, r/2]
    pairs = rope_pair_channels(x.shape[-1], 2 * inv_freq.numel(), True)
    x = x.expand(*x.shape[:-2], positions.numel(), x.shape[-1])  # one vector at every position
    out = apply_vllm_rope(x.movedim(-2, 0), angles.cos(), angles.sin(), pairs, inverse)
    return out.movedim(0, -2)


def _unit_geomean(x: torch.Tensor) -> torch.Tensor:
    return x / x.log().mean(-1, keepdim=True).exp()


def make_hook(
    key_format: KVFormat,
    value_format: KVFormat,
    options: frozenset[str],
    calibration: AblationStats | None,
    dither_seed: int = 0,
    served: dict[int, Any] | None = None,
):
    """The K/V hook that fake-quantizes one candidate (see :mod:`vllm_nf4kv.tools.hf_hooks`).

    ``dither_seed > 0`` first multiplies K and V by ``1 + DITHER * N(0, 1)``: far
    below bf16 precision, yet enough to flip the codes of values that sit on a
    decision boundary. Repeating a candidate under a few seeds shows how much of
    a ΔPPL difference is the luck of those flips (``--repeats``).

    ``served`` (layer -> :class:`vllm_nf4kv.calibration.LayerCalibration`): what a server with
    that calibration stores, keys as ``(k - c) * d`` read back ``/ d + c``, values as ``v - mu``
    read back ``+ mu`` (the same logits and outputs as the server's, which never adds ``c``).
    """
    unknown = set(options) - set(OPTIONS)
    offsets = [o for o in KEY_OFFSETS if o in options]
    if unknown or len(offsets) > 1:
        raise ValueError(
            f"options must be from {OPTIONS} with at most one of {KEY_OFFSETS}, got {sorted(options)}"
        )
    if options and calibration is None:
        raise ValueError(f"options {sorted(options)} need calibration statistics: pass --calib-text")
    offset_kind = offsets[0] if offsets else None
    key_powers = [KEY_WEIGHT_POWERS[o] for o in options if o in KEY_WEIGHT_POWERS]
    if len(key_powers) > 1:
        raise ValueError(f"use at most one key weighting of {list(KEY_WEIGHT_POWERS)}, got {sorted(options)}")
    key_weighted, value_weighted = bool(key_powers), "vow" in options
    generator = torch.Generator().manual_seed(dither_seed)

    def hook(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        if dither_seed:
            key = key * (1 + DITHER * torch.randn(key.shape, generator=generator, dtype=key.dtype))
            value = value * (1 + DITHER * torch.randn(value.shape, generator=generator, dtype=value.dtype))
        if served is not None:
            entry = served[layer]
            d, c, mu = (
                x.to(key.device, key.dtype)[None, :, None, :]
                for x in (entry.key_scale, entry.key_offset, entry.value_offset)
            )
            return key_format((key - c) * d) / d + c, value_format(value - mu) + mu
        if calibration is None:
            return key_format(key), value_format(value)
        added_back = None
        if offset_kind is not None:
            if query.shape[2] != key.shape[2]:
                raise RuntimeError(
                    "key offsets assume whole windows scored from position 0 without a KV cache"
                )
            positions = torch.arange(key.shape[2], device=key.device)
            offset = calibration.key_offset(layer, offset_kind, positions).to(key.device, key.dtype)[None]
            key = key - offset
            if offset_kind == "kpre":  # position-dependent: the reader has to add it back
                added_back = offset
        if key_weighted:
            static = None if added_back is not None or offset_kind is None else offset[0, :, 0, :]
            weights = calibration.key_weights(layer, static, key_powers[0])
            weights = weights.to(key.device, key.dtype)[None, :, None, :]
            key_hat = key_format(key * weights) / weights
        else:
            key_hat = key_format(key)
        if added_back is not None:
            key_hat = key_hat + added_back
        if value_weighted:
            weights = calibration.value_weights(layer).to(value.dtype)[None, :, None, :]
            return key_hat, value_format(value * weights) / weights
        return key_hat, value_format(value)

    return hook


@torch.inference_mode()
def calibrate(
    model: torch.nn.Module, windows: torch.Tensor, text: str, max_position: int | None = None
) -> AblationStats:
    """One pass over calibration windows ``[n, ctx]``: the statistics every option needs."""
    from vllm_nf4kv.tools.hf_hooks import kv_hook

    inv_freq = _rope_inv_freq(model)  # None without a single plain RoPE: kpre / kofflf then refuse
    sums: dict[str, dict[int, torch.Tensor]] = {"k": {}, "kpre": {}, "k2": {}, "q2": {}, "v2": {}}
    count = [0]

    def add(name: str, layer: int, x: torch.Tensor) -> None:
        sums[name][layer] = sums[name].get(layer, 0) + x.double().sum((0, 2))  # [H, D]

    def record(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        group = query.shape[1] // key.shape[1]  # query heads per KV head (repeat_kv order)
        positions = torch.arange(key.shape[2], device=key.device)
        add("k", layer, key)
        if inv_freq is not None:
            add("kpre", layer, apply_rope(key.double(), positions, inv_freq, inverse=True))
        add("k2", layer, key**2)
        add("v2", layer, value**2)
        add("q2", layer, (query**2).unflatten(1, (key.shape[1], group)).mean(2))
        if layer == 0:
            count[0] += key.shape[0] * key.shape[2]
        return key, value

    with kv_hook(record):
        for window in windows:
            model(window[None])
    stats = {name: {layer: (t / count[0]).float() for layer, t in per.items()} for name, per in sums.items()}
    out_weight_sq = {}
    for layer, mean in stats["k"].items():
        heads, head_dim = mean.shape
        weight = _o_proj(model, layer).weight.detach().float()  # [hidden, num_heads * D]
        per_query_head = (weight**2).sum(0).view(-1, head_dim)  # [num_heads, D]
        out_weight_sq[layer] = per_query_head.view(heads, -1, head_dim).sum(1)
    head_dim = next(iter(stats["k"].values())).shape[-1]
    return AblationStats(
        text=text,
        tokens=int(windows.numel()),
        ctx=windows.shape[1],
        rotary_dim=int(head_dim * (getattr(model.config, "partial_rotary_factor", None) or 1.0)),
        inv_freq=inv_freq,
        max_position=max_position or int(model.config.max_position_embeddings),
        key_mean=stats["k"],
        key_pre_mean=stats["kpre"],
        key_sq=stats["k2"],
        query_sq=stats["q2"],
        value_sq=stats["v2"],
        out_weight_sq=out_weight_sq,
    )


def _rope_inv_freq(model: torch.nn.Module) -> torch.Tensor | None:
    """The RoPE frequencies of a HF model with exactly one plain rotary embedding, else None.

    Gemma 3 has two (local and global bases) and keeps them in buffers named per layer type;
    the position-dependent offsets are then unavailable, the static options still work.
    """
    found = [
        module for module in model.modules() if isinstance(getattr(module, "inv_freq", None), torch.Tensor)
    ]
    if len(found) != 1 or float(getattr(found[0], "attention_scaling", 1.0)) != 1.0:
        return None
    return found[0].inv_freq.detach().double().cpu()


def _o_proj(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The attention output projection of one decoder layer (Llama-style module names)."""
    for module in model.modules():
        if getattr(module, "layer_idx", None) == layer and hasattr(module, "o_proj"):
            return module.o_proj
    raise ValueError(f"+vow needs an o_proj in attention layer {layer}; this model has none")
