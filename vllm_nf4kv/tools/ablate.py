"""``vllm-nf4kv ablate``: perplexity cost of KV-cache formats on a real model.

Runs a Hugging Face causal LM in fp32 over non-overlapping windows of a text,
once as the baseline (no KV quantization) and once per candidate with every
layer's K and V fake-quantized after RoPE, as a paged cache holds them. Prints
ΔPPL against the baseline and the bits per value each format stores (all scale
bytes included). ``docs/format.md`` ("Ablation") holds the tables that chose
the shipped default.

A candidate is ``KEY[/VALUE][+option...]`` in the format grammar of
:mod:`vllm_nf4kv.tools.kv_formats` (``VALUE`` defaults to ``KEY``), e.g.
``nf4-g16-ue5m3-s4`` or ``nf4-g8-r5-s8/nf4-g32-ue5m3-s4+kofflf``. Options
(key offsets ``koff``, ``kofflf``, ``kpre``; channel weights ``kqw``, ``vow``;
see :mod:`vllm_nf4kv.tools.kv_calibration`) use static per-(layer, KV head)
statistics measured on ``--calib-text``: use a different text from ``--text``.

ΔPPL of one run moves by a few tenths of a percent when a handful of values on
a code boundary flip; ``--repeats N`` reruns each candidate under a 1e-6
relative dither and prints the mean and standard deviation.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from vllm_nf4kv.tools.kv_calibration import KEY_OFFSETS, OPTIONS, calibrate, make_hook
from vllm_nf4kv.tools.kv_formats import KVFormat, StoredRows, bits_label, parse_format, shipped_spec

STORED = "nf4"  # the candidate that is exactly what --kv-cache-dtype nf4 stores, calibration included

# The default table: references first, then the candidates for the shipped format.
DEFAULT_CANDIDATES: tuple[str, ...] = (
    # references
    "fp32",  # sanity row: the baseline through the hook, ΔPPL must be exactly 0
    "bf16",  # --kv-cache-dtype auto for a bf16 model
    "fp8",
    "int4tok",  # int4_per_token_head emulation
    STORED,  # what the server stores (the model's calibration from --calibration or its default file)
    "nf4-g64-fp32-s1-norot",  # the plain NF4 design: absmax per 64 values, no rotation
    # rotation, group size, scale code and scale search
    "nf4-g64-fp32-s1",
    "nf4-g64-fp32-s4",
    "nf4-g32-fp16-s4",
    "nf4-g16-fp32-s4",  # fp32 scales: 6 bits/value, an upper bound on scale precision
    "nf4-g16-e4m3-s1",
    "nf4-g16-e4m3-s4",
    "nf4-g16-ue5m3-s1",
    "nf4-g16-ue5m3-s4",  # shipped codec at head_dim 64
    "nf4-g16-ue5m3-s8",
    "nf4-g16-ue4m4-s4",
    "nf4-g16-ue5m3-s4-norot",
    "nf4-g32-ue5m3-s4",
    "nf4-g64-ue5m3-s4",
    # where the error comes from (the other side unquantized)
    "nf4-g16-ue5m3-s4/fp32",
    "fp32/nf4-g16-ue5m3-s4",
    # K/V byte splits within 72 B per token and KV head (head_dim 64)
    "nf4-g16-ue5m3-s4/nf4-g32-ue5m3-s4",
    "nf4-g32-ue5m3-s4/nf4-g16-ue5m3-s4",
    "nf4-g8-r3-s8",
    "nf4-g8-r5-s8/nf4-g32-ue5m3-s4",
    "nf4-g8-r6-s16/nf4-g64-ue5m3-s4",
    "nf4-g8-r4-s4/nf4-g16-r4-s4",
    "nf4-g8-r4-s4/nf4-g32-ue5m3-s4",
    "nf4-g8-r4-s8/nf4-g32-ue5m3-s4",
    "nf4-g8-r5-s4/nf4-g32-ue5m3-s4",
    # over the budget: what more scale bytes buy
    "nf4-g8-ue5m3-s4/nf4-g32-ue5m3-s4",
    "nf4-g8-ue5m3-s4",
    # calibrated static options (skipped without --calib-text)
    "fp32+koff",  # sanity row: centring alone must not change perplexity
    "nf4-g16-ue5m3-s4+koff",
    "nf4-g16-ue5m3-s4+kqw",
    "nf4-g16-ue5m3-s4+koff+kqw",
    "nf4-g16-ue5m3-s4+vow",
    "nf4-g8-r5-s8/nf4-g32-ue5m3-s4+kqw",
    "nf4-g8-r5-s8/nf4-g32-ue5m3-s4+koff",
)


@dataclass(frozen=True)
class Candidate:
    spec: str
    key: KVFormat
    value: KVFormat
    options: frozenset[str] = frozenset()

    def bits_per_value(self, head_dim: int) -> float:
        return (self.key.bits_per_value(head_dim) + self.value.bits_per_value(head_dim)) / 2


def parse_candidate(spec: str) -> Candidate:
    """``KEY[/VALUE][+option...]`` or ``nf4`` -> :class:`Candidate` (ValueError names the grammar)."""
    if spec == STORED:
        return Candidate(STORED, StoredRows("nf4 keys", "key"), StoredRows("nf4 values", "value"))
    body, *options = spec.split("+")
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise ValueError(f"unknown candidate option(s) {unknown} in {spec!r}; options are {list(OPTIONS)}")
    if sum(o in KEY_OFFSETS for o in options) > 1:
        raise ValueError(f"{spec!r}: use at most one key offset of {list(KEY_OFFSETS)}")
    key_spec, _, value_spec = body.partition("/")
    return Candidate(spec, parse_format(key_spec), parse_format(value_spec or key_spec), frozenset(options))


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
    calibration, calibration_info = None, None
    if args.calib_text is not None and any(c.options for c in candidates):
        calib_ctx = args.calib_ctx or args.ctx
        calib = token_windows(loaded.tokenizer, args.calib_text, args.calib_tokens, calib_ctx)
        calibration = calibrate(loaded.model, calib, str(args.calib_text), args.koff_max_pos)
        calibration_info = {
            "text": calibration.text,
            "tokens": calibration.tokens,
            "ctx": calibration.ctx,
            "max_position": calibration.max_position,
        }

    stored_layers, stored_calibration = None, None
    if any(c.spec == STORED for c in candidates):
        stored_layers, stored_calibration = served_calibration(args.calibration, loaded.model.config)
        log(f"{STORED}: {stored_calibration}")

    results = []
    for candidate in candidates:
        runs = [
            100.0
            * (
                perplexity(
                    loaded.model,
                    windows,
                    make_hook(
                        candidate.key, candidate.value, candidate.options, calibration, seed,
                        stored_layers if candidate.spec == STORED else None,
                    ),
                )
                / baseline
                - 1.0
            )
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
        "calibration": calibration_info,
        "stored_calibration": stored_calibration,
        "skipped": skipped,
        "results": results,
    }


def served_calibration(requested: str | None, hf_config) -> tuple[dict[int, Any] | None, str]:
    """The calibration a server of this model applies (by HF layer index), and where it is from.

    ``requested``: ``--calibration`` (a file, or ``none``); default: the model's file at
    the location servers look in. The file's vLLM layer names (``model.layers.12...``) map to
    Hugging Face layer indices by their number.
    """
    from vllm_nf4kv import calibration as cal

    if requested == cal.DISABLED:
        return None, "uncalibrated (--calibration none)"
    fingerprint = cal.model_fingerprint(hf_config)
    path = requested or cal.default_path(fingerprint)
    if requested is None and not path.exists():
        return None, f"uncalibrated (no file at {path}; `{cal.CALIBRATE_COMMAND} MODEL` makes one)"
    loaded = cal.load(path)
    if loaded.fingerprint != fingerprint:
        raise ValueError(f"{path} was made for another model ({loaded.model}); see `{cal.CALIBRATE_COMMAND}`")
    layers = {}
    for name, layer in loaded.layers.items():
        match = re.search(r"\.(\d+)\.", name)
        if match is None:
            raise ValueError(f"{path}: cannot tell the layer index of {name!r}")
        layers[int(match.group(1))] = layer
    return layers, f"calibrated from {path}"


def format_table(report: dict) -> str:
    lines = [
        f"model {report['model']}  text {report['text']}",
        f"{report['tokens']} tokens in windows of {report['ctx']}; baseline fp32 (no KV quantization) "
        f"ppl {report['baseline_ppl']:.4f}; head_dim {report['head_dim']}",
    ]
    if report.get("stored_calibration"):
        lines.append(
            f"{STORED} = what --kv-cache-dtype nf4 stores ({report['shipped']}), "
            f"{report['stored_calibration']}"
        )
    if report["calibration"]:
        cal = report["calibration"]
        lines.append(
            f"+options calibrated on {cal['text']} ({cal['tokens']} tokens, windows of {cal['ctx']})"
        )
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
        "--calib-ctx", type=int, default=None, help="calibration window length (default: --ctx)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run each candidate N times, the first as is and the others with a 1e-6 relative dither "
        "of K/V (seeds 1..N-1); print the mean ΔPPL and its standard deviation (default 1)",
    )
    parser.add_argument(
        "--koff-max-pos",
        type=int,
        default=None,
        help="+kofflf: the longest context its offsets must hold for (default: max_position_embeddings)",
    )
    parser.add_argument(
        "--calibration",
        default=None,
        help=f"the calibration file the {STORED!r} candidate applies, or 'none' "
        "(default: the model's file where servers look for it, if any)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--progress", action="store_true", help="log each candidate to stderr as it finishes")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    parser.set_defaults(func=main)
