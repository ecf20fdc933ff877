"""``vllm-nf4kv ablate``: perplexity cost of KV-cache formats on a real model.

Runs a Hugging Face causal LM in fp32 over non-overlapping windows of a text,
once as the baseline (no KV quantization) and once per candidate with every
layer's K and V fake-quantized after RoPE, as a paged cache holds them. Prints
ΔPPL against the baseline and the bits per value each format stores (all scale
bytes included). ``docs/format.md`` ("Ablation") holds the tables that chose
the shipped default.

A candidate is ``KEY[/VALUE][+koff]`` in the format grammar of
:mod:`vllm_nf4kv.tools.kv_formats` (``VALUE`` defaults to ``KEY``), e.g.
``nf4-g16-ue5m3-s4`` or ``nf4-g16-ue5m3-s4/nf4-g32-ue5m3-s4+koff``.

``+koff`` subtracts a static per-(layer, KV head) vector ``c`` from every key
before quantizing and never adds it back: ``q·(k - c) = q·k - q·c`` shifts all
of one query's logits by the same amount, so softmax is unchanged and only the
quantization error differs. ``c`` is the mean post-RoPE key of each layer and
KV head over ``--calib-text`` (use a different text from ``--text``), measured
with the same windowing; being static, it keeps prefix-cache hits exact.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from vllm_nf4kv.tools.kv_formats import KVFormat, bits_label, parse_format, shipped_spec

# The default table: references first, then the candidates for the shipped format.
DEFAULT_CANDIDATES: tuple[str, ...] = (
    # references
    "fp32",  # sanity row: the baseline through the hook, ΔPPL must be exactly 0
    "bf16",  # --kv-cache-dtype auto for a bf16 model
    "fp8",
    "int4tok",  # int4_per_token_head emulation
    "nf4-g64-fp32-s1-norot",  # the plain NF4 design: absmax per 64 values, no rotation
    # rotation, group size and scale code at 4.5 bits/value
    "nf4-g64-fp32-s1",
    "nf4-g64-fp32-s4",
    "nf4-g32-fp16-s1",
    "nf4-g32-fp16-s4",
    "nf4-g16-e4m3-s1",
    "nf4-g16-e4m3-s4",
    "nf4-g16-ue5m3-s1",
    "nf4-g16-ue5m3-s4",  # shipped codec at head_dim 64
    "nf4-g16-ue5m3-s8",
    "nf4-g16-ue4m4-s4",
    "nf4-g16-ue5m3-s4-norot",
    # fewer scale bytes, and K/V splits
    "nf4-g32-ue5m3-s4",
    "nf4-g64-ue5m3-s4",
    "nf4-g16-ue5m3-s4/nf4-g32-ue5m3-s4",
    "nf4-g32-ue5m3-s4/nf4-g16-ue5m3-s4",
    # where the error comes from (the other side unquantized)
    "nf4-g16-ue5m3-s4/fp32",
    "fp32/nf4-g16-ue5m3-s4",
    # static key offset (calibrated on --calib-text)
    "fp32+koff",  # sanity row: centring alone must not change perplexity
    "nf4-g16-ue5m3-s4+koff",
    "nf4-g16-ue5m3-s8+koff",
    "nf4-g16-ue5m3-s4/nf4-g32-ue5m3-s4+koff",
    "int4tok+koff",
    # what more scale bytes would buy (over the 4.5 bits/value budget)
    "nf4-g8-ue5m3-s4",
    "nf4-g8-ue5m3-s4+koff",
)


OPTIONS = ("koff", "kqw", "vow")
DITHER = 1e-6  # relative size of the --repeats perturbation


@dataclass(frozen=True)
class Candidate:
    spec: str
    key: KVFormat
    value: KVFormat
    options: frozenset[str] = frozenset()

    def bits_per_value(self, head_dim: int) -> float:
        return (self.key.bits_per_value(head_dim) + self.value.bits_per_value(head_dim)) / 2


def parse_candidate(spec: str) -> Candidate:
    """``KEY[/VALUE][+option...]`` -> :class:`Candidate` (ValueError names the grammar)."""
    body, *options = spec.split("+")
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise ValueError(f"unknown candidate option(s) {unknown} in {spec!r}; options are {list(OPTIONS)}")
    key_spec, _, value_spec = body.partition("/")
    return Candidate(spec, parse_format(key_spec), parse_format(value_spec or key_spec), frozenset(options))


@dataclass
class Calibration:
    """Static per-(layer, KV head) statistics from a calibration text; every tensor is ``[H, D]`` fp32."""

    text: str
    tokens: int
    key_mean: dict[int, torch.Tensor]
    key_sq: dict[int, torch.Tensor]  # E[k^2]
    query_sq: dict[int, torch.Tensor]  # E[q^2] over the query heads that read the KV head
    value_sq: dict[int, torch.Tensor]  # E[v^2]
    out_weight_sq: dict[int, torch.Tensor]  # sum of o_proj weight^2 over its output rows and query heads

    def key_weights(self, layer: int, centred: bool) -> torch.Tensor:
        """``d = (E[q^2] / E[k^2]) ** (1/4)`` per channel, shared by each RoPE pair (i, i + D/2).

        Keys are stored as ``k * d`` and read as ``k_hat / d`` (a kernel folds ``1/d``
        into the query): for white quantization noise this minimises the error of
        ``q·k``. Pair sums ``x_i + x_{i+D/2}`` are invariant under RoPE (neox-style
        pairs, as HF Llama and vLLM use), so ``d`` does not depend on position.
        """
        key_sq = self.key_sq[layer] - self.key_mean[layer] ** 2 if centred else self.key_sq[layer]
        ratio = _pair_mean(self.query_sq[layer]) / _pair_mean(key_sq).clamp_min(1e-12)
        return _unit_geomean(ratio.clamp_min(1e-12) ** 0.25)

    def value_weights(self, layer: int) -> torch.Tensor:
        """``d = (|W_o column|^2 / E[v^2]) ** (1/4)``: the same argument for the output error after o_proj."""
        ratio = self.out_weight_sq[layer] / self.value_sq[layer].clamp_min(1e-12)
        return _unit_geomean(ratio.clamp_min(1e-12) ** 0.25)


def _pair_mean(x: torch.Tensor) -> torch.Tensor:  # [H, D] -> [H, D], each RoPE pair averaged
    half = x.shape[-1] // 2
    mean = (x[..., :half] + x[..., half:]) / 2
    return torch.cat([mean, mean], -1)


def _unit_geomean(x: torch.Tensor) -> torch.Tensor:
    return x / x.log().mean(-1, keepdim=True).exp()


def make_hook(candidate: Candidate, calibration: Calibration | None, dither_seed: int = 0):
    """The K/V hook that fake-quantizes one candidate.

    ``dither_seed > 0`` first multiplies K and V by ``1 + DITHER * N(0, 1)``: far
    below bf16 precision, yet enough to flip the codes of values that sit on a
    decision boundary. Repeating a candidate under a few seeds shows how much of
    a ΔPPL difference is the luck of those flips (``--repeats``).
    """
    if candidate.options and calibration is None:
        raise ValueError(f"{candidate.spec} needs calibration statistics: pass --calib-text")
    centred, key_weighted, value_weighted = (o in candidate.options for o in OPTIONS)
    generator = torch.Generator().manual_seed(dither_seed)

    def hook(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        if dither_seed:
            key = key * (1 + DITHER * torch.randn(key.shape, generator=generator, dtype=key.dtype))
            value = value * (1 + DITHER * torch.randn(value.shape, generator=generator, dtype=value.dtype))
        if calibration is not None:
            if centred:  # not added back: softmax is invariant to a fixed key offset
                key = key - calibration.key_mean[layer].to(key.dtype)[None, :, None, :]
            if key_weighted:
                weights = calibration.key_weights(layer, centred).to(key.dtype)[None, :, None, :]
                return candidate.key(key * weights) / weights, _value(layer, value)
        return candidate.key(key), _value(layer, value)

    def _value(layer: int, value: torch.Tensor) -> torch.Tensor:
        if not value_weighted:
            return candidate.value(value)
        assert calibration is not None
        weights = calibration.value_weights(layer).to(value.dtype)[None, :, None, :]
        return candidate.value(value * weights) / weights

    return hook


@torch.inference_mode()
def calibrate(model: torch.nn.Module, windows: torch.Tensor, text: str) -> Calibration:
    """One pass over calibration windows: the statistics every ``+option`` needs."""
    from vllm_nf4kv.tools.hf_hooks import kv_hook

    sums: dict[str, dict[int, torch.Tensor]] = {"k": {}, "k2": {}, "q2": {}, "v2": {}}
    count = [0]

    def add(name: str, layer: int, x: torch.Tensor) -> None:
        sums[name][layer] = sums[name].get(layer, 0) + x.double().sum((0, 2))  # [H, D]

    def record(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        group = query.shape[1] // key.shape[1]  # query heads per KV head (repeat_kv order)
        add("k", layer, key)
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
    return Calibration(
        text, int(windows.numel()), stats["k"], stats["k2"], stats["q2"], stats["v2"], out_weight_sq
    )


def _o_proj(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The attention output projection of one decoder layer (Llama-style module names)."""
    for module in model.modules():
        if getattr(module, "layer_idx", None) == layer and hasattr(module, "o_proj"):
            return module.o_proj
    raise ValueError(f"+vow needs an o_proj in attention layer {layer}; this model has none")


def run(args: argparse.Namespace) -> dict:
    from vllm_nf4kv.tools.hf_hooks import load_model, perplexity, token_windows

    torch.set_num_threads(args.threads)
    specs = [s.strip() for s in args.candidates.split(",") if s.strip()] if args.candidates else None
    specs = specs or list(DEFAULT_CANDIDATES)
    candidates = [parse_candidate(s) for s in specs]  # fail on a typo before loading anything
    skipped = []
    if args.calib_text is None:
        skipped = [c.spec for c in candidates if c.options]
        candidates = [c for c in candidates if not c.options]

    loaded = load_model(args.model)
    windows = token_windows(loaded.tokenizer, args.text, args.tokens, args.ctx)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.progress else (lambda msg: None)
    started = time.monotonic()
    baseline = perplexity(loaded.model, windows)
    log(f"baseline fp32 ppl {baseline:.4f} ({time.monotonic() - started:.0f} s)")
    calibration = None
    if args.calib_text is not None and any(c.options for c in candidates):
        calib = token_windows(loaded.tokenizer, args.calib_text, args.calib_tokens, args.ctx)
        calibration = calibrate(loaded.model, calib, str(args.calib_text))

    results = []
    for candidate in candidates:
        runs = [
            100.0
            * (perplexity(loaded.model, windows, make_hook(candidate, calibration, seed)) / baseline - 1.0)
            for seed in range(args.repeats)
        ]
        mean = sum(runs) / len(runs)
        row = {
            "candidate": candidate.spec,
            "key": candidate.key.spec,
            "value": candidate.value.spec,
            "options": sorted(candidate.options),
            "bits_per_value": candidate.bits_per_value(loaded.head_dim),
            "ppl": baseline * (1 + mean / 100),
            "delta_ppl_pct": mean,  # mean over --repeats
            "delta_ppl_pct_runs": runs,
            "delta_ppl_pct_std": statistics.stdev(runs) if len(runs) > 1 else 0.0,
        }
        results.append(row)
        spread = " ".join(f"{r:+.2f}" for r in runs)
        log(f"{candidate.spec:<45} {mean:+7.2f}%  [{spread}]  ({time.monotonic() - started:.0f} s)")
    return {
        "model": str(args.model),
        "text": str(args.text),
        "tokens": int(windows.numel()),
        "ctx": args.ctx,
        "repeats": args.repeats,
        "head_dim": loaded.head_dim,
        "shipped": shipped_spec(loaded.head_dim),
        "baseline_ppl": baseline,
        "calibration": calibration and {"text": calibration.text, "tokens": calibration.tokens},
        "skipped": skipped,
        "results": results,
    }


def format_table(report: dict) -> str:
    lines = [
        f"model {report['model']}  text {report['text']}",
        f"{report['tokens']} tokens in windows of {report['ctx']}; baseline fp32 (no KV quantization) "
        f"ppl {report['baseline_ppl']:.4f}; head_dim {report['head_dim']}",
    ]
    if report["calibration"]:
        cal = report["calibration"]
        lines.append(f"+options calibrated on {cal['text']} ({cal['tokens']} tokens)")
    repeats = report["repeats"]
    if repeats > 1:
        lines.append(f"ΔPPL: mean of {repeats} runs (1 plain + {repeats - 1} dithered), ± standard deviation")
    lines.append("")
    spread = " ± std |" if repeats > 1 else ""
    lines.append(f"| {'candidate (K[/V][+options])':<42} | bits/value | {'ppl':>8} | {'ΔPPL':>8} |{spread}")
    lines.append(f"|{'-' * 44}|-----------:|---------:|---------:|" + ("------:|" if repeats > 1 else ""))
    for row in report["results"]:
        line = (
            f"| {row['candidate']:<42} | {bits_label(row['bits_per_value']):>10} | "
            f"{row['ppl']:8.4f} | {row['delta_ppl_pct']:+7.2f}% |"
        )
        if repeats > 1:
            line += f" {row['delta_ppl_pct_std']:5.2f} |"
        lines.append(line)
    if report["skipped"]:
        lines.append("")
        lines.append(f"skipped (+options need --calib-text): {', '.join(report['skipped'])}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    report = run(args)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "ablate",
        help="perplexity ablation of KV formats on a real model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--text", required=True, help="UTF-8 text to score")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens scored (default 8192)")
    parser.add_argument("--ctx", type=int, default=1024, help="window length (default 1024)")
    parser.add_argument(
        "--candidates",
        default=None,
        help="comma-separated candidate specs (default: the built-in table, see DEFAULT_CANDIDATES)",
    )
    parser.add_argument(
        "--calib-text",
        default=None,
        help="text for the +koff key offsets; use a different text from --text "
        "(without it, +koff candidates are skipped)",
    )
    parser.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens (default 2048)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run each candidate N times, the first as is and the others with a 1e-6 relative dither "
        "of K/V (seeds 1..N-1); print the mean ΔPPL and its standard deviation (default 1)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--progress", action="store_true", help="log each candidate to stderr as it finishes")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    parser.set_defaults(func=main)
