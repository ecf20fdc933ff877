"""Per-model calibration of the nf4 cache: the file, its lookup, its checks and the quality gate.

What a calibration is for and how it is measured: :mod:`vllm_nf4kv.calibration_measure` (key
smoothing ``(k * d)`` for keys with outlier channels, key and value offsets for biased keys, and
the capture ``vllm-nf4kv calibrate`` runs). What the backends apply per step:
:mod:`vllm_nf4kv.kv_transform`. This module is what an engine does once at startup.

The statistics are measured once per model by ``vllm-nf4kv calibrate`` from the queries
and keys vLLM's own attention layers hand the nf4 backend (so RoPE, QK-norm, sliding
windows and head sharding are vLLM's), written as JSON, and loaded by every engine that
serves the model with ``--kv-cache-dtype nf4``:

* from ``--additional-config '{"nf4kv": {"calibration": "FILE"}}'``, or
* from the default location, :func:`default_path` (``~/.cache/vllm-nf4kv/calibration/``,
  one file per model fingerprint), where ``vllm-nf4kv calibrate MODEL`` writes;
* ``"calibration": "none"`` serves uncalibrated (``d = 1``), as does a model with no file,
  with one log line naming the command to run.

Keys are stored as ``(k - c) * d`` with no add-back and values as ``v - mu`` with ``mu`` added to
the output; both are exact by construction. The key offsets depend on how far RoPE turns the
keys, so a file holds one set per context length (:meth:`Calibration.for_context`).
Uncalibrated, a biased model such as Qwen2.5-Coder-0.5B lost +173% perplexity on Moby Dick
through vLLM (docs/results/vllm-cpu-qwen.md).

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

from vllm_nf4kv.calibration_measure import KEY_SMOOTHING_POWER

FILE_VERSION = 2  # 2: key and value offsets, the measured attention error per layer
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
    if x.shape != shape or not bool(torch.isfinite(x).all()) or (positive and not bool((x > 0).all())):
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
        f'--additional-config \'{{"nf4kv": {{"{ACCEPT_QUALITY_RISK.key}": true}}}}\' '
        f"({ACCEPT_QUALITY_RISK.env_var}=1)"
    )
