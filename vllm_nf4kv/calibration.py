"""Per-model calibration of the nf4 cache: the file, its lookup, its checks and the quality gate.

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

Why offsets: models whose projections add a bias to keys and values (the Qwen2 family) store
keys dominated by one large vector; after the Hadamard rotation it sets every scale and the
token-dependent part falls between two NF4 levels (Qwen2.5-Coder-0.5B: +173% perplexity on Moby
Dick through vLLM, docs/results/vllm-cpu-qwen.md).
Subtracting a constant ``c`` from every key of a head shifts all of one query's logits by
``q · c``, which softmax ignores, so keys are stored as ``(k - c) * d`` with no add-back;
values are stored as ``v - mu`` and ``mu`` is added to the output (the weights sum to 1).
Both are exact by construction. RoPE turns a key bias with the position, so ``c`` is chosen
per channel to hold at every position of the context length served (:func:`key_offset`,
:meth:`Calibration.for_context`).

A file made for another model or head layout is refused at startup, and so is a file whose
measured attention error is above :data:`MAX_ATTENTION_ERROR` in any layer (the quality gate,
:func:`quality_refusal`). The transform is a fixed elementwise map per layer, so a prefix-cache
hit still equals a cold run bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch

FILE_VERSION = 2  # 2: key and value offsets, the measured attention error per layer
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
    """One attention layer's transform: keys stored as ``(k - c) * d``, values as ``v - mu``.

    Each tensor is fp32 ``[num_kv_heads, head_dim]``, row ``h`` for KV head ``h``.
    """

    num_kv_heads: int
    head_dim: int
    key_scale: torch.Tensor  # d, geometric mean 1 per head (ones: not smoothed)
    key_offset: torch.Tensor  # c (zeros: none)
    value_offset: torch.Tensor  # mu (zeros: none)
    power: float = KEY_SMOOTHING_POWER  # the smoothing strength calibrate chose for this layer (0: none)
    error_ratio: float = 1.0  # its attention error on the calibration windows over the uncalibrated one's
    attention_error: float = 0.0  # relative attention-output error of what is served (quality gate)


@dataclass(frozen=True)
class Calibration:
    """A calibration file's content (see ``docs/format.md``, "Calibration").

    Key offsets depend on how far RoPE turns the keys, so the file holds one set of layers per
    context length (``by_context``: each for every position below its length); an engine serves
    the shortest set that covers its ``max_model_len`` (:meth:`for_context`).
    """

    fingerprint: str
    model: str  # as given to ``vllm-nf4kv calibrate`` (for messages only)
    text: str  # what it was measured on
    tokens: int
    ctx: int
    powers: tuple[float, ...]  # the strengths calibrate chose among, per layer
    # context length -> layers by vLLM layer name (``model.layers.0.self_attn.attn``)
    by_context: dict[int, dict[str, LayerCalibration]]
    source: str = ""  # the file it was read from
    context: int = 0  # the context length served (for_context); 0: none chosen, the longest

    @property
    def layers(self) -> dict[str, LayerCalibration]:
        """The layers served: those for :attr:`context` (the longest context's before one is chosen)."""
        return self.by_context[self.context or max(self.by_context)]

    def for_context(self, max_model_len: int) -> Calibration:
        """This calibration for an engine of ``max_model_len`` tokens: the shortest set covering it.

        A longer context than any set covers (RoPE scaling set at serve time) gets the longest:
        still exact (any offset is), only its offsets were not made for those positions.
        """
        covering = [length for length in self.by_context if length >= max_model_len]
        return replace(self, context=min(covering) if covering else max(self.by_context))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FILE_VERSION,
            "fingerprint": self.fingerprint,
            "model": self.model,
            "text": self.text,
            "tokens": self.tokens,
            "ctx": self.ctx,
            "key_smoothing_powers": list(self.powers),
            "contexts": [
                {"max_position": length, "layers": _layers_json(layers)}
                for length, layers in sorted(self.by_context.items())
            ],
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
        raise ValueError(
            f"{where}: version {data.get('version')!r}, this vllm-nf4kv reads {FILE_VERSION} "
            f"(key and value offsets, measured errors); run `{CALIBRATE_COMMAND} MODEL` again"
        )
    by_context = {}
    for context in data.get("contexts") or ():
        by_context[int(context["max_position"])] = _parse_layers(where, context.get("layers") or {})
    if not by_context or not all(by_context.values()):
        raise ValueError(f"{where} has no layers")
    return Calibration(
        fingerprint=str(data["fingerprint"]),
        model=str(data.get("model", "")),
        text=str(data.get("text", "")),
        tokens=int(data.get("tokens", 0)),
        ctx=int(data.get("ctx", 0)),
        powers=tuple(float(x) for x in data.get("key_smoothing_powers", (KEY_SMOOTHING_POWER,))),
        by_context=by_context,
        source=source,
    )


def _layers_json(layers: dict[str, LayerCalibration]) -> dict[str, Any]:
    return {
        name: {
            "num_kv_heads": layer.num_kv_heads,
            "head_dim": layer.head_dim,
            "power": layer.power,
            "attention_error_ratio": round(layer.error_ratio, 4),
            "attention_error": float(f"{layer.attention_error:.4g}"),
            "key_scale": layer.key_scale.tolist(),
            "key_offset": layer.key_offset.tolist(),
            "value_offset": layer.value_offset.tolist(),
        }
        for name, layer in sorted(layers.items())
    }


def _parse_layers(where: str, entries: Mapping[str, Any]) -> dict[str, LayerCalibration]:
    layers = {}
    for name, entry in dict(entries).items():
        heads, head_dim = int(entry["num_kv_heads"]), int(entry["head_dim"])
        key_scale, key_offset, value_offset = (
            _layer_tensor(where, name, entry, field, (heads, head_dim), positive=field == "key_scale")
            for field in ("key_scale", "key_offset", "value_offset")
        )
        layers[name] = LayerCalibration(
            heads,
            head_dim,
            key_scale,
            key_offset,
            value_offset,
            power=float(entry.get("power", KEY_SMOOTHING_POWER)),
            error_ratio=float(entry.get("attention_error_ratio", 1.0)),
            attention_error=float(entry["attention_error"]),
        )
    return layers


def _layer_tensor(
    where: str, name: str, entry: Mapping[str, Any], field: str, shape: tuple[int, int], positive: bool
) -> torch.Tensor:
    """One ``[num_kv_heads, head_dim]`` field of a layer's entry, checked (ValueError names it)."""
    x = torch.tensor(entry[field], dtype=torch.float32)
    if (
        x.shape != shape
        or not bool(torch.isfinite(x).all())
        or (positive and not bool((x > 0).all()))
    ):
        kind = "positive finite" if positive else "finite"
        raise ValueError(
            f"{where}: layer {name!r} needs {field} of {kind} numbers shaped "
            f"[{shape[0]}, {shape[1]}], got {tuple(x.shape)}"
        )
    return x


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
    accept_risk: bool = False  # accept_quality_risk: the quality gate is waived (quality_gate.py)


def resolve(additional_config: Any, hf_config: Any, max_model_len: int = 0) -> Resolved:
    """What ``--additional-config`` or the default location gives for this model, checked."""
    from vllm_nf4kv.settings import CALIBRATION, nf4kv_section

    requested = nf4kv_section(additional_config).get(CALIBRATION.key)
    if requested is None:  # absent or null: the variable, as for every other setting
        requested = os.environ.get(CALIBRATION.env_var)
    if requested is not None and not isinstance(requested, str):
        raise ValueError(
            f"--additional-config nf4kv.{CALIBRATION.key} must be a file path or "
            f'"{DISABLED}", got {requested!r}'
        )
    accept = accepts_quality_risk(additional_config)
    resolved = _resolve(requested or None, model_fingerprint(hf_config), int(max_model_len), accept)
    return replace(resolved, accept_risk=accept)


def accepts_quality_risk(additional_config: Any) -> bool:
    """Whether the quality gate is waived (``accept_quality_risk``, or its variable), checked."""
    from vllm_nf4kv.settings import ACCEPT_QUALITY_RISK, nf4kv_section

    value = nf4kv_section(additional_config).get(ACCEPT_QUALITY_RISK.key)
    if value is None:
        variable = os.environ.get(ACCEPT_QUALITY_RISK.env_var, "").strip()
        if variable not in ("", "0", "1"):
            raise ValueError(f"{ACCEPT_QUALITY_RISK.env_var}={variable!r}: give 1, 0, or unset it")
        return variable == "1"
    if not isinstance(value, bool):
        raise ValueError(
            f"--additional-config nf4kv.{ACCEPT_QUALITY_RISK.key} must be true or false, got {value!r}"
        )
    return value


@cache  # every attention layer of an engine asks; the file is read once per process
def _resolve(
    requested: str | None, fingerprint: str, max_model_len: int = 0, accept_risk: bool = False
) -> Resolved:
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
    calibration = calibration.for_context(max_model_len)
    refusal = quality_refusal(calibration)
    if refusal is not None and not accept_risk:
        raise ValueError(refusal)
    smoothed = sum(layer.power > 0 for layer in calibration.layers.values())
    centred = sum(bool(layer.key_offset.any()) for layer in calibration.layers.values())
    worst = max(layer.attention_error for layer in calibration.layers.values())
    accepted = "" if refusal is None else f"; over the quality bound, accepted by setting: {refusal}"
    return Resolved(
        calibration,
        f"calibrated from {calibration.source} ({calibration.text}, {calibration.tokens} tokens; "
        f"{smoothed} of {len(calibration.layers)} attention layers smoothed, {centred} with key offsets "
        f"for contexts up to {calibration.context}; "
        f"largest attention error {worst:.4f}, bound {MAX_ATTENTION_ERROR}{accepted})",
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


class KVTransform:
    """Applies one layer's calibration, exact by construction (module docstring).

    Keys become ``(k - c) * d`` and values ``v - mu`` before the store; queries ``q / d``
    before attention; ``mu`` is added to the output. The tensors move to the device once,
    on first use, and every step after that uses the same ones.
    """

    def __init__(
        self, key_scale: torch.Tensor, key_offset: torch.Tensor, value_offset: torch.Tensor, num_heads: int
    ) -> None:
        group = num_heads // key_scale.shape[0]
        self.key_scale = key_scale.contiguous()  # [Hkv, D]
        self.key_offset = key_offset.contiguous() if bool(key_offset.any()) else None
        self.value_offset = value_offset.contiguous() if bool(value_offset.any()) else None
        self.query_scale = (1.0 / key_scale).repeat_interleave(group, 0).contiguous()  # [Hq, D]
        self.output_offset = (
            None if self.value_offset is None else self.value_offset.repeat_interleave(group, 0).contiguous()
        )
        self._device = torch.device("cpu")

    @property
    def is_identity(self) -> bool:
        return bool((self.key_scale == 1).all()) and self.key_offset is None and self.value_offset is None

    def move_to(self, device: torch.device) -> None:
        """Put the tables on ``device`` (once: later calls on the same device do nothing)."""
        if device != self._device:
            for name in ("key_scale", "key_offset", "value_offset", "query_scale", "output_offset"):
                value = getattr(self, name)
                if value is not None:
                    setattr(self, name, value.to(device))
            self._device = device

    def store_tables(self, device: torch.device) -> dict[str, torch.Tensor | None]:
        """What the Triton store kernel applies itself (``store_kv_nf4``'s keyword arguments)."""
        self.move_to(device)
        return {"key_offset": self.key_offset, "key_scale": self.key_scale, "value_offset": self.value_offset}

    def attention_tables(self, device: torch.device) -> dict[str, torch.Tensor | None]:
        """What the Triton attention kernel applies itself (``nf4_paged_attention``'s keyword arguments)."""
        self.move_to(device)
        return {"query_scale": self.query_scale, "output_offset": self.output_offset}

    def keys(self, key: torch.Tensor) -> torch.Tensor:
        """``[T, Hkv, D]`` -> fp32 ``(k - c) * d``."""
        self.move_to(key.device)
        key = key.float() if self.key_offset is None else key.float() - self.key_offset
        return key * self.key_scale

    def values(self, value: torch.Tensor) -> torch.Tensor:
        """``[T, Hkv, D]`` -> ``v - mu`` in fp32 (unchanged without a value offset)."""
        self.move_to(value.device)
        return value if self.value_offset is None else value.float() - self.value_offset

    def queries(self, query: torch.Tensor) -> torch.Tensor:
        """``[T, Hq, D]`` -> fp32 ``q / d`` (as a product with ``1 / d``, the same bits every call)."""
        self.move_to(query.device)
        return query.float() * self.query_scale

    def outputs(self, output: torch.Tensor) -> torch.Tensor:
        """``[T, Hq, D]`` attention over ``v - mu`` -> over ``v`` (the weights sum to 1)."""
        self.move_to(output.device)
        return output if self.output_offset is None else output + self.output_offset


# ---------------------------------------------------------------- the quality gate

# The largest relative attention-output error (sum |o_nf4 - o|^2 / sum |o|^2 over calibrate's
# windows, per layer) a server accepts. Measured with what is served (docs/format.md, "Quality
# gate"): every layer of SmolLM2-135M, Gemma-3-270m and calibrated Qwen2.5-Coder-0.5B, at every
# context set, is at most 0.09 (Qwen's layer 0 with offsets for 32,768 positions: +3.0%
# perplexity at 1,024 tokens in a one-off probe, docs/format.md; typically 0.005-0.02);
# uncalibrated Qwen2.5-Coder-0.5B, +173% to +929%,
# has layers at 0.33, 0.33 and 1.5. 0.2 sits between, with room on both sides.
MAX_ATTENTION_ERROR = 0.2
WORST_LAYERS_SHOWN = 3


def quality_refusal(calibration: Calibration) -> str | None:
    """Why this calibration must not be served (layers over :data:`MAX_ATTENTION_ERROR`), or None."""
    over = sorted(
        ((layer.attention_error, name) for name, layer in calibration.layers.items()
         if not layer.attention_error <= MAX_ATTENTION_ERROR),
        reverse=True,
    )  # fmt: skip
    if not over:
        return None
    worst = ", ".join(f"{name} {error:.3f}" for error, name in over[:WORST_LAYERS_SHOWN])
    shorter = [
        length for length, layers in calibration.by_context.items()
        if length < calibration.context
        and all(layer.attention_error <= MAX_ATTENTION_ERROR for layer in layers.values())
    ]  # fmt: skip
    hint = f"--max-model-len {max(shorter)} (offsets hold better over fewer positions), " if shorter else ""
    return (
        f"nf4 KV cache refused: {calibration.source or 'the calibration'} measured a relative "
        f"attention error above {MAX_ATTENTION_ERROR} in {len(over)} of {len(calibration.layers)} "
        f"layers for contexts up to {calibration.context} (worst: {worst}); nf4 would damage this "
        f"model. Serve it with {hint}--kv-cache-dtype auto or fp8, or accept the loss knowingly "
        f"with {accept_hint()}"
    )


def accept_hint() -> str:
    from vllm_nf4kv.settings import ACCEPT_QUALITY_RISK

    return (
        f"--additional-config '{{\"nf4kv\": {{\"{ACCEPT_QUALITY_RISK.key}\": true}}}}' "
        f"({ACCEPT_QUALITY_RISK.env_var}=1)"
    )


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
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor],
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
