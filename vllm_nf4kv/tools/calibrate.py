"""``vllm-nf4kv calibrate MODEL``: measure the nf4 key smoothing of one model through vLLM.

Runs the model in an in-process vLLM engine with ``--kv-cache-dtype nf4`` (uncalibrated)
over a fixed built-in public-domain text (Lincoln's 1862 annual message, not one of the
texts the format is evaluated on), while the nf4 backend records the queries and keys
vLLM's attention layers hand it: RoPE, QK-norm, sliding windows and head layout are
vLLM's own. Each RoPE pair's statistics are averaged over its two channels (vLLM's own
``rotary_emb`` says which channels pair), so the smoothing holds at any context length.
Writes the file the engines load (:mod:`vllm_nf4kv.calibration`), by default where they
look for it. Deterministic: the same model and arguments give the same file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

DEFAULT_TOKENS = 4096
DEFAULT_CTX = 1024
SMOOTHING_MARGIN = 0.85  # smooth a layer only if that cuts its attention error to <= 85% (choose_smoothing)
TEXT_NAME = "Lincoln, annual message of 1862 (built in)"


def builtin_text() -> str:
    return resources.files("vllm_nf4kv").joinpath("data/calibration_text.txt").read_text()


def _rope_layout(model: Any) -> dict[str, tuple[int, int, bool]]:
    """layer name -> (head_dim, rotary_dim, is_neox_style) of every attention with a rotary embedding."""
    found = {}
    for module in model.modules():
        attn, rope = getattr(module, "attn", None), getattr(module, "rotary_emb", None)
        if attn is None or rope is None or not hasattr(attn, "layer_name"):
            continue
        if not hasattr(rope, "is_neox_style") or not hasattr(rope, "rotary_dim"):
            continue
        found[attn.layer_name] = (int(attn.head_size), int(rope.rotary_dim), bool(rope.is_neox_style))
    return found


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None):
    """fp32 causal attention of one window: ``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]`` -> ``[T, Hq, D]``.

    fp32 is plenty: the differences it measures are nf4's, about 1e-2 relative.
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    logits = torch.einsum("qhd,khd->hqk", q, k) * scale
    position = torch.arange(q.shape[0])
    visible = position[None, :] <= position[:, None]
    if window is not None:
        visible &= position[:, None] - position[None, :] < window
    weights = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", weights, v)


@dataclass
class ScoredWindow:
    """One calibration window, with what every smoothing strength is compared against."""

    query: torch.Tensor
    key: torch.Tensor
    served_values: torch.Tensor  # the shipped value rows' round trip (smoothing leaves values alone)
    exact: torch.Tensor  # the attention output without KV quantization


def scored_windows(samples: Any) -> list[ScoredWindow]:
    from vllm_nf4kv.format import KV_CACHE_DTYPE, format_for
    from vllm_nf4kv.reference import fake_quantize_rows

    windows = []
    for q, k, v in samples.windows:
        layout = format_for(KV_CACHE_DTYPE, k.shape[-1])
        exact = causal_attention(q, k, v, samples.scale, samples.sliding_window)
        windows.append(ScoredWindow(q, k, fake_quantize_rows(v, layout.value), exact))
    return windows


def attention_error(samples: Any, windows: list[ScoredWindow], key_scale: torch.Tensor) -> float:
    """Squared error of the layer's attention output when its cache holds nf4 rows of ``k * d``.

    The served arithmetic: keys stored as ``k * d`` (the shipped key rows), read with ``q / d``,
    i.e. ``q · (fake_quantize(k * d) / d)``; values as the shipped value rows.
    """
    from vllm_nf4kv.format import KV_CACHE_DTYPE, format_for
    from vllm_nf4kv.reference import fake_quantize_rows

    total = 0.0
    for window in windows:
        row = format_for(KV_CACHE_DTYPE, window.key.shape[-1]).key
        key = fake_quantize_rows(window.key * key_scale, row) / key_scale
        served = causal_attention(
            window.query, key, window.served_values, samples.scale, samples.sliding_window
        )
        total += float((served - window.exact).double().square().sum())
    return total


def choose_smoothing(
    samples: Any, sum_q2: torch.Tensor, sum_k2: torch.Tensor
) -> tuple[float, torch.Tensor, float]:
    """The smoothing of one layer: ``(power, d, error ratio)``, scored by the layer's attention error.

    Every strength of ``KEY_SMOOTHING_POWERS`` is tried on the calibration windows; the best
    is kept only if it cuts the error to at most ``SMOOTHING_MARGIN`` of no smoothing's, else
    the layer is not smoothed (power 0, ``d = 1``). Why the margin: where keys have no outlier
    channels (SmolLM2) the ratios only scatter, 0.88-1.1 for every strength, and smoothing
    such layers cost perplexity through vLLM (+2.1% vs +1.5% on Moby Dick); where they have
    (Gemma-3-270m's QK-norm keys) the best strength cuts the error to 0.05-0.75.
    Returns the chosen error over no smoothing's (1.0 when not smoothed).
    """
    from vllm_nf4kv import calibration as cal

    windows = scored_windows(samples)
    options = []
    for power in cal.KEY_SMOOTHING_POWERS:
        key_scale = cal.key_smoothing(sum_q2, sum_k2, power)
        options.append((attention_error(samples, windows, key_scale), power, key_scale))
    unsmoothed = next(option for option in options if option[1] == 0.0)
    best = min(options, key=lambda option: option[0])  # the first minimum: the weaker smoothing on ties
    if unsmoothed[0] <= 0 or best[0] > SMOOTHING_MARGIN * unsmoothed[0]:
        return 0.0, unsmoothed[2], 1.0
    return best[1], best[2], best[0] / unsmoothed[0]


def _windows(tokenizer: Any, text: str, tokens: int, ctx: int) -> list[list[int]]:
    """``tokens`` tokens of ``text`` in windows of ``ctx``, each opened as a prompt is (BOS)."""
    prefix = tokenizer.encode("", add_special_tokens=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    step = ctx - len(prefix)
    if len(ids) < tokens // ctx * step or tokens < ctx:
        raise ValueError(
            f"the calibration text has {len(ids)} tokens; {tokens} in windows of {ctx} requested"
        )
    return [prefix + ids[i * step : (i + 1) * step] for i in range(tokens // ctx)]


def calibrate(model: str, tokens: int = DEFAULT_TOKENS, ctx: int = DEFAULT_CTX, log=print) -> Any:
    """Run the engine over the built-in text and return the :class:`~vllm_nf4kv.calibration.Calibration`."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the capture lives in this process's backend
    from vllm import LLM, SamplingParams, TokensPrompt

    from vllm_nf4kv import calibration as cal

    started = time.monotonic()
    llm = LLM(
        model=model,
        kv_cache_dtype="nf4",
        additional_config={"nf4kv": {"calibration": cal.DISABLED}},  # measure what vLLM hands over
        enable_prefix_caching=False,
        max_model_len=ctx + 1,  # the prompt and the one token generate() insists on
        max_num_seqs=1,  # one whole window per step: what the capture keeps as samples
        max_num_batched_tokens=max(ctx + 1, 2048),
        enforce_eager=True,
        kv_cache_memory_bytes=256 << 20,
        seed=0,
    )
    hf_config = llm.llm_engine.vllm_config.model_config.hf_text_config
    rope = llm.apply_model(_rope_layout)[0]
    windows = _windows(llm.get_tokenizer(), builtin_text(), tokens, ctx)
    capture = cal.Capture()
    cal.ACTIVE_CAPTURE.append(capture)
    try:
        params = SamplingParams(max_tokens=1, temperature=0.0)
        llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
    finally:
        cal.ACTIVE_CAPTURE.remove(capture)
    if not capture.sum_k2:
        raise RuntimeError("no attention layer reported its keys: is the nf4 backend serving this model?")
    layers = {}
    for name in sorted(capture.sum_k2):
        sum_q2, sum_k2 = capture.sum_q2[name], capture.sum_k2[name]
        heads, head_dim = sum_k2.shape
        if name in rope:
            pairs = cal.rope_pairs(head_dim, rope[name][1], rope[name][2])
            sum_q2, sum_k2 = cal.pair_mean(sum_q2, pairs), cal.pair_mean(sum_k2, pairs)
        power, key_scale, ratio = choose_smoothing(capture.samples[name], sum_q2, sum_k2)
        layers[name] = cal.LayerCalibration(heads, head_dim, key_scale, power, ratio)
    log(
        f"calibrated {len(layers)} attention layers on {sum(len(w) for w in windows)} tokens "
        f"({len(rope)} with RoPE pairs) in {time.monotonic() - started:.0f} s; smoothing strength (attention "
        f"error vs none) per layer: "
        + ", ".join(f"{layer.power:g} ({layer.error_ratio:.2f})" for layer in layers.values())
    )
    del llm
    return cal.Calibration(
        fingerprint=cal.model_fingerprint(hf_config),
        model=model,
        text=TEXT_NAME,
        tokens=sum(len(w) for w in windows),
        ctx=ctx,
        powers=cal.KEY_SMOOTHING_POWERS,
        layers=layers,
    )


def existing_default(model: str) -> Path | None:
    """The model's file at the default location, if there is one (without starting vLLM)."""
    from transformers import AutoConfig

    from vllm_nf4kv import calibration as cal

    path = cal.default_path(cal.model_fingerprint(AutoConfig.from_pretrained(model).get_text_config()))
    return path if path.exists() else None


def main(args: argparse.Namespace) -> int:
    from vllm_nf4kv import calibration as cal

    if args.if_missing and not args.out:
        found = existing_default(args.model)
        if found is not None:
            print(f"vllm-nf4kv: calibration of {args.model} already at {found}", file=sys.stderr)
            print(found)
            return 0
    result = calibrate(args.model, args.tokens, args.ctx, log=lambda msg: print(msg, file=sys.stderr))
    out = Path(args.out) if args.out else cal.default_path(result.fingerprint)
    result.write(out)
    print(out)
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="measure the nf4 key smoothing of a model through vLLM",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="model directory or name, as given to vllm serve")
    parser.add_argument(
        "--out",
        default=None,
        help="file to write (default: the location engines look in, ~/.cache/vllm-nf4kv/calibration/)",
    )
    parser.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing when the model already has a file at the default location (make serve)",
    )
    parser.add_argument(
        "--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens measured (default {DEFAULT_TOKENS})"
    )
    parser.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"window length (default {DEFAULT_CTX})")
    parser.set_defaults(func=main)
