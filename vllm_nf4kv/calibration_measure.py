"""What ``vllm-nf4kv calibrate`` measures, and the formulas that turn it into a calibration.

Split from :mod:`vllm_nf4kv.calibration` (the file servers load and its checks) because this is
the measuring side: the capture the nf4 backends feed while ``calibrate`` runs, vLLM's RoPE
pairs, and the one implementation of the key smoothing and the key offsets, which the
ablation (``tools/kv_calibration.py``) calls too, so its figures are the servers' formula.

Why smoothing: keys carry most of nf4's error, and on models with QK-norm (Gemma 3, Qwen 3) a
few channels of every key are far larger than the rest; after the Hadamard rotation their
quantization noise lands on every channel the query reads. Storing ``k * d`` and reading
with ``q / d`` leaves every logit exactly as it was (``q · k = (q / d) · (k * d)``, per
channel, after RoPE) while the noise is shaped by ``d``; the ``d`` that minimises the
logit error for white noise is ``(E[q^2] / E[k^2]) ** (1/4)`` per channel (the ablation's
``+kqw``, docs/format.md). Where keys have no outlier channels (SmolLM2) it helps nothing and
costs a little, so ``vllm-nf4kv calibrate`` scores several strengths per layer by the layer's
own attention error and smooths only the layers where that error falls clearly
(``tools/calibrate.py``, ``best_smoothing``).

Why offsets: models whose projections add a bias to keys and values (the Qwen2 family) store
keys dominated by one large vector; after the Hadamard rotation it sets every scale and the
token-dependent part falls between two NF4 levels. Subtracting a constant ``c`` from every key
of a head shifts all of one query's logits by ``q · c``, which softmax ignores. RoPE turns a key
bias with the position, so ``c`` is chosen per channel to hold at every position of the context
length served (:func:`key_offset`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

KEY_SMOOTHING_POWER = 0.25  # d = (E[q^2] / E[k^2]) ** power: the white-noise optimum
# the strengths vllm-nf4kv calibrate scores per layer (0: no smoothing), by the attention error
KEY_SMOOTHING_POWERS = (0.0, 0.125, 0.25, 0.375, 0.5)


# ---------------------------------------------------------------- key smoothing


def key_smoothing(
    sum_q2: torch.Tensor, sum_k2: torch.Tensor, power: float = KEY_SMOOTHING_POWER
) -> torch.Tensor:
    """``d = (E[q^2] / E[k^2]) ** power`` per channel, scaled to geometric mean 1 per head.

    ``sum_q2`` / ``sum_k2``: ``[num_kv_heads, head_dim]`` fp64 sums over the same tokens (the
    query side averaged over the query heads of each KV head). Channels a model never uses
    (no energy at all) keep ``d = 1``. Geometric mean 1 keeps the stored keys' magnitude,
    so the scale codes keep their range.
    """
    tiny = torch.finfo(torch.float32).tiny
    q2, k2 = sum_q2.double(), sum_k2.double()
    used = (q2 > tiny) & (k2 > tiny)
    ratio = torch.where(used, q2 / k2.clamp_min(tiny), torch.ones_like(q2))
    d = ratio**power
    d = d / d.log().mean(-1, keepdim=True).exp()
    return d.float()


def centred_square(key_sq: torch.Tensor, key_mean: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``E[(k - c)^2]`` per channel from ``E[k^2]``, ``E[k]`` and the offset ``c`` (fp64, >= 0).

    What :func:`key_smoothing` weighs keys stored as ``(k - c) * d`` by.
    """
    c = offset.double()
    return (key_sq.double() - 2 * c * key_mean.double() + c.square()).clamp_min(0)


def pair_mean(x: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` with each RoPE pair's two channels replaced by their mean.

    ``pairs [D]``: the channel each channel turns with (itself where RoPE leaves it alone).
    A pair's summed energy does not change as RoPE turns it, so pair means measured over
    short windows hold at every position, however long the context.
    """
    return (x + x[..., pairs]) / 2


def rope_pairs(head_dim: int, rotary_dim: int, is_neox_style: bool) -> torch.Tensor:
    """The partner channel of each channel under vLLM's RoPE (neox: i, i + r/2; GPT-J: 2i, 2i + 1)."""
    partner = torch.arange(head_dim)
    half = rotary_dim // 2
    if is_neox_style:
        partner[:half] = torch.arange(half, rotary_dim)
        partner[half:rotary_dim] = torch.arange(half)
    else:
        partner[:rotary_dim] = torch.arange(rotary_dim) ^ 1
    return partner


# ---------------------------------------------------------------- key offsets and RoPE


def rope_pair_channels(
    head_dim: int, rotary_dim: int, is_neox_style: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two channels of each RoPE pair, in frequency order (neox: i, i + r/2; GPT-J: 2i, 2i + 1)."""
    half = rotary_dim // 2
    if is_neox_style:
        return torch.arange(half), torch.arange(half, rotary_dim)
    return torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2)


def apply_rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pairs: tuple[torch.Tensor, torch.Tensor],
    inverse: bool = False,
) -> torch.Tensor:
    """``x [T, ..., D]`` turned by vLLM's RoPE at each row's position (``cos``/``sin [T, r/2]``).

    ``inverse`` undoes it (dividing by ``cos^2 + sin^2``, which scaled RoPEs such as YaRN
    make other than 1). Channels outside the pairs stay as they are.
    """
    first, second = pairs
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
    cos, sin = cos.to(x.dtype).view(shape), sin.to(x.dtype).view(shape)
    a, b = x[..., first], x[..., second]
    out = x.clone()
    if inverse:
        norm = cos * cos + sin * sin
        out[..., first], out[..., second] = (a * cos + b * sin) / norm, (b * cos - a * sin) / norm
    else:
        out[..., first], out[..., second] = a * cos - b * sin, b * cos + a * sin
    return out


def key_offset(
    pre_rope_mean: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pairs: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The constant ``c`` subtracted from keys: the centre of the mean key's path over positions.

    The mean key at position ``p`` is ``R(p) m`` (``m``: the mean key before RoPE, ``[H, D]``).
    Per channel, ``c`` is the midpoint of its smallest and largest value over every position
    ``cos``/``sin`` cover (``[P, r/2]``): the largest ``|R(p) m - c|`` over those positions is
    the smallest any constant gives, never above the largest ``|R(p) m|`` (what sets a group's
    scale). Pairs that barely turn get their bias removed, pairs that turn over the context
    get ``c`` near 0. Exact for any ``c`` (module docstring).
    """
    mean = pre_rope_mean.double()
    high, low = None, None
    for start in range(0, cos.shape[0], 4096):  # positions in chunks: a long context's path is large
        chunk = slice(start, start + 4096)
        n = cos[chunk].shape[0]
        path = apply_rope(mean.expand(n, *mean.shape), cos[chunk], sin[chunk], pairs)
        high = path.amax(0) if high is None else torch.maximum(high, path.amax(0))
        low = path.amin(0) if low is None else torch.minimum(low, path.amin(0))
    return ((high + low) / 2).float()


# ---------------------------------------------------------------- measuring (vllm-nf4kv calibrate)


SAMPLE_TOKENS = 512  # the first tokens of a window kept whole per layer, to score smoothing strengths
SAMPLE_WINDOWS = 2


@dataclass
class LayerSamples:
    """Whole windows of one layer's queries, keys and values, and how the layer attends."""

    scale: float
    sliding_window: int | None
    windows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # fp32 [T, Hq, D], [T, Hkv, D] x 2


@dataclass(frozen=True)
class LayerRope:
    """One layer's RoPE as vLLM applies it: ``cos``/``sin [max_position, rotary_dim / 2]`` and its pairs."""

    cos: torch.Tensor
    sin: torch.Tensor
    pairs: tuple[torch.Tensor, torch.Tensor]


class Capture:
    """fp64 sums per layer, KV head and channel of what the backend sees, and sample windows.

    Sums of ``q^2``, ``k^2``, ``k``, of the keys before RoPE (turned back with the layer's
    :class:`LayerRope`, when ``calibrate`` found one) and of ``v``; and the first
    ``SAMPLE_TOKENS`` tokens of the first ``SAMPLE_WINDOWS`` whole-window prefills of each layer
    (q, k and v), so ``vllm-nf4kv calibrate`` can score its choices by the attention error they
    give. Installed by ``calibrate`` around its prompts, each one window prefilled in one step
    from position 0 (so a token's position is its index); the nf4 backends call
    :meth:`observe` from ``forward`` with the raw (untransformed) tensors of the step's tokens.
    """

    def __init__(self, rope: dict[str, LayerRope] | None = None) -> None:
        self.rope = rope or {}
        self.sum_q2: dict[str, torch.Tensor] = {}
        self.sum_k2: dict[str, torch.Tensor] = {}
        self.sum_k: dict[str, torch.Tensor] = {}
        self.sum_k_pre_rope: dict[str, torch.Tensor] = {}
        self.sum_v: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.samples: dict[str, LayerSamples] = {}

    def observe(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """``query [T, Hq, D]``, ``key`` / ``value [T, Hkv, D]`` of one step's tokens."""
        name, heads = layer.layer_name, key.shape[1]
        pre_rope = key.double()
        rope = self.rope.get(name)
        if rope is not None:
            t = key.shape[0]
            pre_rope = apply_rope(pre_rope, rope.cos[:t], rope.sin[:t], rope.pairs, inverse=True)
        sums = {
            "sum_q2": query.double().square().unflatten(1, (heads, -1)).mean(2).sum(0),  # [Hkv, D]
            "sum_k2": key.double().square().sum(0),
            "sum_k": key.double().sum(0),
            "sum_k_pre_rope": pre_rope.sum(0),
            "sum_v": value.double().sum(0),
        }
        for field, total in sums.items():
            found = getattr(self, field)
            found[name] = found[name] + total if name in found else total
        self.tokens[name] = self.tokens.get(name, 0) + key.shape[0]
        samples = self.samples.get(name)
        if samples is None:
            window = getattr(layer.impl, "sliding_window", None)
            samples = LayerSamples(float(layer.impl.scale), window if window and window > 0 else None, [])
            self.samples[name] = samples
        if key.shape[0] >= SAMPLE_TOKENS and len(samples.windows) < SAMPLE_WINDOWS:  # a whole prefill
            t = SAMPLE_TOKENS
            window = tuple(x[:t].float().clone() for x in (query, key, value))
            samples.windows.append(window)


ACTIVE_CAPTURE: list[Capture] = []  # the one being filled, if any (one process: in-process engine)


def observe(layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """The backends' hook: a no-op unless ``vllm-nf4kv calibrate`` is measuring."""
    if ACTIVE_CAPTURE:
        ACTIVE_CAPTURE[-1].observe(layer, query, key, value)
