"""Per-model key smoothing for the nf4 cache: the calibration file, its lookup and its checks.

Why: keys carry most of nf4's error, and on models with QK-norm (Gemma 3, Qwen 3) a few
channels of every key are far larger than the rest; after the Hadamard rotation their
quantization noise lands on every channel the query reads. Storing ``k * d`` and reading
with ``q / d`` leaves every logit exactly as it was (``q · k = (q / d) · (k * d)``, per
channel, after RoPE) while the noise is shaped by ``d``; the ``d`` that minimises the
logit error for white noise is ``(E[q^2] / E[k^2]) ** (1/4)`` per channel (the ablation's
``+kqw``: Gemma-3-270m +14.9% -> +0.7% ΔPPL, docs/format.md). Where keys have no outlier
channels (SmolLM2) it helps nothing and costs a little, so ``vllm-nf4kv calibrate`` scores
several strengths per layer by the layer's own attention error and smooths only the layers
where that error falls clearly (``tools/calibrate.py``, ``choose_smoothing``).

The statistics are measured once per model by ``vllm-nf4kv calibrate`` from the queries
and keys vLLM's own attention layers hand the nf4 backend (so RoPE, QK-norm, sliding
windows and head sharding are vLLM's), written as JSON, and loaded by every engine that
serves the model with ``--kv-cache-dtype nf4``:

* from ``--additional-config '{"nf4kv": {"calibration": "FILE"}}'``, or
* from the default location, :func:`default_path` (``~/.cache/vllm-nf4kv/calibration/``,
  one file per model fingerprint), where ``vllm-nf4kv calibrate MODEL`` writes;
* ``"calibration": "none"`` serves uncalibrated (``d = 1``), as does a model with no file,
  with one log line naming the command to run.

A file made for another model or head layout is refused at startup. The transform is a
fixed elementwise product per layer, so a prefix-cache hit still equals a cold run bit for
bit.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

FILE_VERSION = 1
KEY_SMOOTHING_POWER = 0.25  # d = (E[q^2] / E[k^2]) ** power: the white-noise optimum
# the strengths vllm-nf4kv calibrate scores per layer (0: no smoothing), by the attention error
KEY_SMOOTHING_POWERS = (0.0, 0.125, 0.25, 0.375, 0.5)
DISABLED = "none"  # "calibration": "none" serves with d = 1
CALIBRATE_COMMAND = "vllm-nf4kv calibrate"

# The hf_text_config fields that decide a model's attention layers and their statistics: two
# models that agree on all of them can share a file only if they are the same weights (the
# fingerprint cannot tell fine-tunes of one base apart; docs/format.md says so).
FINGERPRINT_FIELDS = (
    "architectures",
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "sliding_window",
    "layer_types",
    "query_pre_attn_scalar",
    "max_position_embeddings",
)


def model_fingerprint(hf_config: Any) -> str:
    """A short hash of the config fields that decide the attention layers (see FINGERPRINT_FIELDS)."""
    fields = {}
    for name in FINGERPRINT_FIELDS:
        value = getattr(hf_config, name, None)
        if value is not None:
            fields[name] = value
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/vllm-nf4kv/calibration`` (``~/.cache`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "vllm-nf4kv" / "calibration"


def default_path(fingerprint: str) -> Path:
    return default_dir() / f"{fingerprint}.json"


@dataclass(frozen=True)
class LayerCalibration:
    """One attention layer's smoothing: ``key_scale[h]`` is ``d`` of KV head ``h``."""

    num_kv_heads: int
    head_dim: int
    key_scale: torch.Tensor  # fp32 [num_kv_heads, head_dim], geometric mean 1 per head
    power: float = KEY_SMOOTHING_POWER  # the smoothing strength calibrate chose for this layer (0: none)
    error_ratio: float = 1.0  # its attention error on the calibration windows over no smoothing's


@dataclass(frozen=True)
class Calibration:
    """A calibration file's content (see ``docs/format.md``, "Calibration")."""

    fingerprint: str
    model: str  # as given to ``vllm-nf4kv calibrate`` (for messages only)
    text: str  # what it was measured on
    tokens: int
    ctx: int
    powers: tuple[float, ...]  # the strengths calibrate chose among, per layer
    layers: dict[str, LayerCalibration]  # by vLLM layer name (``model.layers.0.self_attn.attn``)
    source: str = ""  # the file it was read from

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FILE_VERSION,
            "fingerprint": self.fingerprint,
            "model": self.model,
            "text": self.text,
            "tokens": self.tokens,
            "ctx": self.ctx,
            "key_smoothing_powers": list(self.powers),
            "layers": {
                name: {
                    "num_kv_heads": layer.num_kv_heads,
                    "head_dim": layer.head_dim,
                    "power": layer.power,
                    "attention_error_ratio": round(layer.error_ratio, 4),
                    "key_scale": layer.key_scale.tolist(),
                }
                for name, layer in sorted(self.layers.items())
            },
        }

    def write(self, path: Path) -> None:
        """Write atomically (a concurrent server never reads half a file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        partial.replace(path)

    def layer(self, name: str, num_kv_heads: int, head_dim: int) -> LayerCalibration:
        """The calibration of layer ``name`` with this many KV heads (all ranks' together), or refuse."""
        found = self.layers.get(name)
        if found is None:
            raise ValueError(
                f"nf4 calibration {self.source or '(in memory)'} has no attention layer {name!r} "
                f"(it was made for {self.model}); run `{CALIBRATE_COMMAND} MODEL` for this model"
            )
        if (found.num_kv_heads, found.head_dim) != (num_kv_heads, head_dim):
            raise ValueError(
                f"nf4 calibration {self.source}: layer {name!r} was calibrated with "
                f"{found.num_kv_heads} KV heads of head_dim {found.head_dim}, this model has "
                f"{num_kv_heads} of {head_dim}; run `{CALIBRATE_COMMAND} MODEL` for this model"
            )
        return found


def parse(data: Mapping[str, Any], source: str = "") -> Calibration:
    """A calibration from its JSON object, every field checked (ValueError names the file)."""
    where = f"nf4 calibration {source or '(in memory)'}"
    if data.get("version") != FILE_VERSION:
        raise ValueError(f"{where}: version {data.get('version')!r}, this vllm-nf4kv reads {FILE_VERSION}")
    layers = {}
    for name, entry in dict(data.get("layers") or {}).items():
        scale = torch.tensor(entry["key_scale"], dtype=torch.float32)
        heads, head_dim = int(entry["num_kv_heads"]), int(entry["head_dim"])
        if (
            scale.shape != (heads, head_dim)
            or not bool(torch.isfinite(scale).all())
            or not bool((scale > 0).all())
        ):
            raise ValueError(
                f"{where}: layer {name!r} needs key_scale of positive finite numbers shaped "
                f"[{heads}, {head_dim}], got {tuple(scale.shape)}"
            )
        power = float(entry.get("power", KEY_SMOOTHING_POWER))
        ratio = float(entry.get("attention_error_ratio", 1.0))
        layers[name] = LayerCalibration(heads, head_dim, scale, power, ratio)
    if not layers:
        raise ValueError(f"{where} has no layers")
    return Calibration(
        fingerprint=str(data["fingerprint"]),
        model=str(data.get("model", "")),
        text=str(data.get("text", "")),
        tokens=int(data.get("tokens", 0)),
        ctx=int(data.get("ctx", 0)),
        powers=tuple(float(x) for x in data.get("key_smoothing_powers", (KEY_SMOOTHING_POWER,))),
        layers=layers,
        source=source,
    )


def load(path: str | Path) -> Calibration:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"nf4 calibration file {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"nf4 calibration file {path} is not readable JSON: {error}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"nf4 calibration file {path} must hold a JSON object")
    try:
        return parse(data, str(path))
    except (KeyError, TypeError) as error:
        raise ValueError(f"nf4 calibration file {path} is malformed: missing or bad {error}") from None


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


# ---------------------------------------------------------------- what an engine serves


@dataclass(frozen=True)
class Resolved:
    """The calibration one engine serves with (None: uncalibrated) and why."""

    calibration: Calibration | None
    reason: str


def resolve(additional_config: Any, hf_config: Any) -> Resolved:
    """What ``--additional-config`` or the default location gives for this model, checked."""
    from vllm_nf4kv.settings import CALIBRATION, nf4kv_section

    requested = nf4kv_section(additional_config).get(CALIBRATION.key, os.environ.get(CALIBRATION.env_var))
    if requested is not None and not isinstance(requested, str):
        raise ValueError(
            f"--additional-config nf4kv.{CALIBRATION.key} must be a file path or "
            f'"{DISABLED}", got {requested!r}'
        )
    return _resolve(requested or None, model_fingerprint(hf_config))


@cache  # every attention layer of an engine asks; the file is read once per process
def _resolve(requested: str | None, fingerprint: str) -> Resolved:
    from vllm_nf4kv.settings import CALIBRATION

    if requested == DISABLED:
        return Resolved(None, f'uncalibrated ("{CALIBRATION.key}": "{DISABLED}")')
    if requested:
        calibration = load(requested)
    else:
        path = default_path(fingerprint)
        if not path.exists():
            return Resolved(
                None,
                f"uncalibrated: no calibration for this model at {path}; `{CALIBRATE_COMMAND} MODEL` "
                f"makes one (keys then cost less perplexity, docs/format.md)",
            )
        calibration = load(path)
    if calibration.fingerprint != fingerprint:
        raise ValueError(
            f"nf4 calibration {calibration.source} was made for another model ({calibration.model}, "
            f"fingerprint {calibration.fingerprint}; this one is {fingerprint}); run "
            f"`{CALIBRATE_COMMAND} MODEL --out FILE` for this model or drop the setting"
        )
    smoothed = sum(layer.power > 0 for layer in calibration.layers.values())
    return Resolved(
        calibration,
        f"calibrated from {calibration.source} ({calibration.text}, {calibration.tokens} tokens; "
        f"{smoothed} of {len(calibration.layers)} attention layers smoothed)",
    )


def local_heads(num_kv_heads_local: int, total_kv_heads: int, tp_rank: int, tp_size: int) -> slice:
    """Which of the calibration's KV heads this tensor-parallel rank holds (vLLM's sharding).

    vLLM splits KV heads evenly over ranks, or, with fewer KV heads than ranks, gives each
    rank one head shared by ``tp_size / total_kv_heads`` consecutive ranks.
    """
    if total_kv_heads >= tp_size:
        start = tp_rank * num_kv_heads_local
    else:
        start = tp_rank * total_kv_heads // tp_size
    return slice(start, start + num_kv_heads_local)


class KeySmoother:
    """Applies one layer's ``d``: keys become ``k * d`` before the store, queries ``q / d``."""

    def __init__(self, key_scale: torch.Tensor, num_heads: int) -> None:
        group = num_heads // key_scale.shape[0]
        self.key_scale = key_scale.contiguous()  # [Hkv, D]
        self.query_scale = (1.0 / key_scale).repeat_interleave(group, 0).contiguous()  # [Hq, D]

    def keys(self, key: torch.Tensor) -> torch.Tensor:
        """``[T, Hkv, D]`` -> fp32 ``k * d``."""
        return key.float() * self.key_scale.to(key.device)

    def queries(self, query: torch.Tensor) -> torch.Tensor:
        """``[T, Hq, D]`` -> fp32 ``q / d`` (as a product with ``1 / d``, the same bits every call)."""
        return query.float() * self.query_scale.to(query.device)


# ---------------------------------------------------------------- measuring (vllm-nf4kv calibrate)


SAMPLE_TOKENS = 512  # the first tokens of a window kept whole per layer, to score smoothing strengths
SAMPLE_WINDOWS = 2


@dataclass
class LayerSamples:
    """Whole windows of one layer's queries, keys and values, and how the layer attends."""

    scale: float
    sliding_window: int | None
    windows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # fp32 [T, Hq, D], [T, Hkv, D] x 2


class Capture:
    """fp64 sums of ``q^2`` and ``k^2`` per layer, KV head and channel, as the backend sees them.

    Also keeps the first ``SAMPLE_TOKENS`` tokens of the first ``SAMPLE_WINDOWS`` whole-window
    prefills of each layer (q, k and v), so ``vllm-nf4kv calibrate`` can score smoothing
    strengths by the attention error they give. Installed by ``calibrate`` around its prompts;
    the nf4 backends call :meth:`observe` from ``forward`` with the raw (unsmoothed) tensors of
    the step's real tokens.
    """

    def __init__(self) -> None:
        self.sum_q2: dict[str, torch.Tensor] = {}
        self.sum_k2: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.samples: dict[str, LayerSamples] = {}

    def observe(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """``query [T, Hq, D]``, ``key`` / ``value [T, Hkv, D]`` of one step's tokens."""
        name, heads = layer.layer_name, key.shape[1]
        q2 = query.double().square().unflatten(1, (heads, -1)).mean(2).sum(0)  # [Hkv, D]
        k2 = key.double().square().sum(0)
        if name in self.sum_q2:
            self.sum_q2[name] += q2
            self.sum_k2[name] += k2
            self.tokens[name] += key.shape[0]
        else:
            self.sum_q2[name], self.sum_k2[name] = q2, k2
            self.tokens[name] = key.shape[0]
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
