"""``vllm-nf4kv calibrate MODEL``: measure what nf4 needs for one model through vLLM, and its error.

Runs the model in an in-process vLLM engine with ``--kv-cache-dtype nf4`` (uncalibrated)
over a fixed built-in public-domain text (Lincoln's 1862 annual message, not one of the
texts the format is evaluated on), while the nf4 backend records the queries, keys and
values vLLM's attention layers hand it: RoPE, QK-norm, biases, sliding windows and head
layout are vLLM's own. Per layer it measures the key smoothing (each RoPE pair's statistics
averaged over its two channels, vLLM's own ``rotary_emb`` says which, so it holds at any
context length), the key and value offsets (keys turned back through vLLM's own RoPE table;
one set per context length, :func:`context_lengths`) and the attention error of what will be
served, which the quality gate reads. Writes the file the engines load
(:mod:`vllm_nf4kv.calibration`), by default where they look for it. Deterministic: the same
model and arguments give the same file.
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
SMOOTHING_MARGIN = 0.85  # smooth a layer only if that cuts its attention error to <= 85% (best_smoothing)
OFFSET_MARGIN = 0.95  # give a layer offsets only if they cut its attention error to <= 95%
SHORTEST_CONTEXT = 2048  # the shortest context length a file holds its own offsets for
TEXT_NAME = "Lincoln, annual message of 1862 (built in)"


def builtin_text() -> str:
    return resources.files("vllm_nf4kv").joinpath("data/calibration_text.txt").read_text()


def _rope_layout(model: Any) -> dict[str, tuple[int, int, bool, torch.Tensor | None]]:
    """layer name -> (head_dim, rotary_dim, is_neox_style, cos_sin_cache) of every attention with RoPE.

    ``cos_sin_cache`` (vLLM's ``[max_position, rotary_dim]`` table, cos then sin) is None where a
    rotary embedding keeps none (then the pairs still say how statistics pair, but keys get no
    offset: where the key bias sits at each position is unknown).
    """
    found = {}
    for module in model.modules():
        attn, rope = getattr(module, "attn", None), getattr(module, "rotary_emb", None)
        if attn is None or rope is None or not hasattr(attn, "layer_name"):
            continue
        if not hasattr(rope, "is_neox_style") or not hasattr(rope, "rotary_dim"):
            continue
        table = getattr(rope, "cos_sin_cache", None)
        plain = isinstance(table, torch.Tensor) and table.dim() == 2 and table.shape[1] == rope.rotary_dim
        cache = table.detach().double().cpu().clone() if plain else None
        found[attn.layer_name] = (int(attn.head_size), int(rope.rotary_dim), bool(rope.is_neox_style), cache)
    return found


def layer_ropes(layout: dict[str, tuple[int, int, bool, torch.Tensor | None]]) -> dict[str, Any]:
    """The :class:`~vllm_nf4kv.calibration_measure.LayerRope` of each layer whose RoPE table is known."""
    from vllm_nf4kv import calibration_measure as measure

    ropes = {}
    for name, (head_dim, rotary_dim, neox, cache) in layout.items():
        if cache is not None:
            half = rotary_dim // 2
            pairs = measure.rope_pair_channels(head_dim, rotary_dim, neox)
            ropes[name] = measure.LayerRope(cache[:, :half], cache[:, half:], pairs)
    return ropes


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
    """One calibration window, with the attention output every choice is compared against."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    exact: torch.Tensor  # the attention output without KV quantization


@dataclass(frozen=True)
class Transform:
    """What a layer may store: keys ``(k - c) * d``, values ``v - mu`` (each ``[Hkv, D]``)."""

    key_scale: torch.Tensor
    key_offset: torch.Tensor
    value_offset: torch.Tensor
    power: float = 0.0


def scored_windows(samples: Any) -> list[ScoredWindow]:
    return [
        ScoredWindow(q, k, v, causal_attention(q, k, v, samples.scale, samples.sliding_window))
        for q, k, v in samples.windows
    ]


def output_energy(windows: list[ScoredWindow]) -> float:
    return sum(float(window.exact.double().square().sum()) for window in windows)


def attention_error(samples: Any, windows: list[ScoredWindow], transform: Transform) -> float:
    """Squared error of the layer's attention output when its cache holds what ``transform`` stores.

    The served arithmetic: the shipped key rows of ``(k - c) * d`` read with ``q / d`` (the
    offset ``c`` drops out of softmax, so it is added back here only to compare), the shipped
    value rows of ``v - mu`` with ``mu`` added to the output.
    """
    from vllm_nf4kv.format import KV_CACHE_DTYPE, format_for
    from vllm_nf4kv.reference import fake_quantize_rows

    total = 0.0
    d, c, mu = transform.key_scale, transform.key_offset, transform.value_offset
    for window in windows:
        layout = format_for(KV_CACHE_DTYPE, window.key.shape[-1])
        key = fake_quantize_rows((window.key - c) * d, layout.key) / d + c
        value = fake_quantize_rows(window.value - mu, layout.value) + mu
        served = causal_attention(window.query, key, value, samples.scale, samples.sliding_window)
        total += float((served - window.exact).double().square().sum())
    return total


@dataclass(frozen=True)
class LayerStatistics:
    """One layer's sums from the capture, as means: ``[Hkv, D]`` each."""

    query_sq: torch.Tensor
    key_sq: torch.Tensor
    key_mean: torch.Tensor
    key_offset: torch.Tensor  # c from key_offset(), zeros where the layer's RoPE is unknown
    value_mean: torch.Tensor


@dataclass(frozen=True)
class Chosen:
    """The transform calibrate keeps for one layer and how it scored."""

    transform: Transform
    error_ratio: float  # its attention error over the uncalibrated one's
    attention_error: float  # relative: squared error over the exact output's energy


@dataclass(frozen=True)
class Scored:
    """One candidate transform and its squared attention error on the calibration windows."""

    error: float
    transform: Transform


def best_smoothing(
    samples: Any,
    windows: list[ScoredWindow],
    stats: LayerStatistics,
    offsets: bool,
    pairs: torch.Tensor | None,
) -> tuple[Scored, Scored]:
    """The best smoothing strength with or without offsets, and the same offsets unsmoothed.

    A strength is kept only if it cuts the error to at most ``SMOOTHING_MARGIN`` of no
    smoothing's (why: where keys have no outlier channels, as in SmolLM2, the ratios only
    scatter, 0.88-1.1 for every strength, and smoothing such layers cost perplexity through
    vLLM: +2.1% vs +1.5% on Moby Dick; with Gemma-3-270m's QK-norm keys the best strength cuts
    the error to 0.05-0.75).
    """
    from vllm_nf4kv import calibration_measure as measure

    zeros = torch.zeros(stats.key_sq.shape)
    c = stats.key_offset.float() if offsets else zeros
    mu = stats.value_mean.float() if offsets else zeros
    # E[(k - c)^2] per channel, pair-averaged like the query statistics
    key_sq = measure.centred_square(stats.key_sq, stats.key_mean, c)
    if pairs is not None:
        key_sq = measure.pair_mean(key_sq, pairs)
    scored = []
    for power in measure.KEY_SMOOTHING_POWERS:
        transform = Transform(measure.key_smoothing(stats.query_sq, key_sq, power), c, mu, power)
        scored.append(Scored(attention_error(samples, windows, transform), transform))
    plain = scored[0]  # power 0: no smoothing
    best = min(scored, key=lambda option: option.error)  # the first minimum: the weaker on ties
    return (best if best.error <= SMOOTHING_MARGIN * plain.error else plain), plain


def choose_transform(
    samples: Any,
    windows: list[ScoredWindow],
    stats: LayerStatistics,
    pairs: torch.Tensor | None,
    without: tuple[Scored, Scored],
) -> Chosen:
    """A layer's offsets and smoothing strength, scored by the layer's attention error.

    ``without``: :func:`best_smoothing` without offsets (the same for every context length).
    Offsets (key ``c`` and value ``mu`` together) are kept only if they cut the error to at
    most ``OFFSET_MARGIN`` of none's: on biased keys (Qwen2) they cut it to a few percent; on
    centred ones they change next to nothing, and nothing is changed for nothing.
    """
    with_offsets, _ = best_smoothing(samples, windows, stats, True, pairs)
    best_without, uncalibrated = without
    chosen = with_offsets if with_offsets.error <= OFFSET_MARGIN * best_without.error else best_without
    energy = output_energy(windows)
    t = chosen.transform
    served_as_is = t.power == 0 and not bool(t.key_offset.any()) and not bool(t.value_offset.any())
    ratio = 1.0 if served_as_is or uncalibrated.error <= 0 else chosen.error / uncalibrated.error
    return Chosen(t, ratio, chosen.error / energy if energy > 0 else 0.0)


def context_lengths(longest: int) -> list[int]:
    """The context lengths a file holds offsets for: 2,048, 4,096, ... up to the model's longest.

    Shorter contexts get offsets that remove more of a key bias (RoPE turns it less over
    them): Qwen2.5-Coder-0.5B lost +3.0% on Moby Dick with offsets made for 32,768 positions,
    +1.0% with those for 2,048 (a one-off probe at 1,024 tokens, docs/format.md).
    """
    lengths, length = [], SHORTEST_CONTEXT
    while length < longest:
        lengths.append(length)
        length *= 2
    return lengths + [longest]


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
    from vllm_nf4kv import calibration_measure as measure

    started = time.monotonic()
    llm = LLM(
        model=model,
        kv_cache_dtype="nf4",
        # measure what vLLM hands over; the quality gate would refuse a model that needs calibrating
        additional_config={"nf4kv": {"calibration": cal.DISABLED, "accept_quality_risk": True}},
        enable_prefix_caching=False,
        max_model_len=ctx + 1,  # the prompt and the one token generate() insists on
        max_num_seqs=1,  # one whole window per step, from position 0: what the capture assumes
        max_num_batched_tokens=max(ctx + 1, 2048),
        enforce_eager=True,
        kv_cache_memory_bytes=256 << 20,
        seed=0,
    )
    hf_config = llm.llm_engine.vllm_config.model_config.hf_text_config
    rope = llm.apply_model(_rope_layout)[0]
    ropes = layer_ropes(rope)
    windows = _windows(llm.get_tokenizer(), builtin_text(), tokens, ctx)
    capture = measure.Capture(ropes)
    measure.ACTIVE_CAPTURE.append(capture)
    try:
        params = SamplingParams(max_tokens=1, temperature=0.0)
        llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
    finally:
        measure.ACTIVE_CAPTURE.remove(capture)
    if not capture.sum_k2:
        raise RuntimeError("no attention layer reported its keys: is the nf4 backend serving this model?")
    longest = min((r.cos.shape[0] for r in ropes.values()), default=0)
    contexts = context_lengths(longest or int(getattr(hf_config, "max_position_embeddings", 0) or ctx))
    by_context: dict[int, dict[str, Any]] = {length: {} for length in contexts}
    for name in sorted(capture.sum_k2):
        count = capture.tokens[name]
        query_sq, key_sq = capture.sum_q2[name] / count, capture.sum_k2[name] / count
        key_mean, value_mean = capture.sum_k[name] / count, capture.sum_v[name] / count
        heads, head_dim = key_sq.shape
        pairs = None
        if name in rope:
            pairs = measure.rope_pairs(head_dim, rope[name][1], rope[name][2])
            query_sq = measure.pair_mean(query_sq, pairs)
        samples = capture.samples[name]
        scored = scored_windows(samples)
        stats = LayerStatistics(query_sq, key_sq, key_mean, torch.zeros(heads, head_dim), value_mean)
        without = best_smoothing(samples, scored, stats, False, pairs)
        for length in contexts:
            if name in ropes:
                r = ropes[name]
                pre_rope_mean = capture.sum_k_pre_rope[name] / count
                offset = measure.key_offset(pre_rope_mean, r.cos[:length], r.sin[:length], r.pairs)
            elif name in rope:  # RoPE without a table we can read: no key offset
                offset = torch.zeros(heads, head_dim)
            else:  # no RoPE: keys do not turn, their mean is the offset
                offset = key_mean.float()
            stats = LayerStatistics(query_sq, key_sq, key_mean, offset, value_mean)
            chosen = choose_transform(samples, scored, stats, pairs, without)
            t = chosen.transform
            by_context[length][name] = cal.LayerCalibration(
                heads, head_dim, t.key_scale, t.key_offset, t.value_offset,
                power=t.power, error_ratio=chosen.error_ratio, attention_error=chosen.attention_error,
            )  # fmt: skip
    for length, layers in by_context.items():
        centred = sum(bool(layer.key_offset.any()) for layer in layers.values())
        log(
            f"contexts up to {length}: {centred} of {len(layers)} layers with offsets; smoothing strength, "
            f"attention error (vs uncalibrated) per layer: "
            + ", ".join(
                f"{layer.power:g} {layer.attention_error:.4f} ({layer.error_ratio:.2f})"
                for layer in layers.values()
            )
        )
    log(
        f"calibrated {len(capture.sum_k2)} attention layers on {sum(len(w) for w in windows)} tokens "
        f"({len(rope)} with RoPE pairs) for contexts up to {', '.join(map(str, contexts))} "
        f"in {time.monotonic() - started:.0f} s"
    )
    del llm
    return cal.Calibration(
        fingerprint=cal.model_fingerprint(hf_config),
        model=model,
        text=TEXT_NAME,
        tokens=sum(len(w) for w in windows),
        ctx=ctx,
        powers=measure.KEY_SMOOTHING_POWERS,
        by_context=by_context,
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
            try:
                cal.load(found)
            except ValueError as error:  # an older file version: servers would refuse it, so replace it
                print(f"vllm-nf4kv: {error}; calibrating again", file=sys.stderr)
            else:
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
        help="measure the nf4 key offsets and smoothing of a model through vLLM, and its error",
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
        help="do nothing when the model already has a current file at the default location (make serve)",
    )
    parser.add_argument(
        "--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens measured (default {DEFAULT_TOKENS})"
    )
    parser.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"window length (default {DEFAULT_CTX})")
    parser.set_defaults(func=main)
