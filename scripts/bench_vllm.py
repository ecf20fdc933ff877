"""Capacity and quality of auto / fp8 / nf4 through real vLLM engines, as markdown.

    .venv/bin/python scripts/bench_vllm.py [--model DIR] [--tokens 4096] [--window 1024]
        [--calibration FILE] [--text-files moby_dick.txt,sotu_2000_2021.txt] [--out docs/results/....md]

Every dtype runs with the same ``--kv-cache-memory-bytes``; perplexity comes
from ``prompt_logprobs`` (the K/V of each window are written to and read back
from the engine's cache), greedy agreement from 8 prompts x 32 tokens. nf4 serves
with the model's calibration (``--calibration``, else the file servers find at the
default location) and once without it; the output names the file, the context set
it served, the git revision and the CPU.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import provenance  # noqa: E402

from vllm_nf4kv.tools.llm_measures import (  # noqa: E402
    GREEDY_PROMPTS,
    greedy_agreement,
    greedy_tokens,
    kv_capacity_tokens,
    perplexity,
    token_windows,
)

TEXT_NAMES = {
    "moby_dick.txt": "Moby Dick",
    "sotu_2000_2021.txt": "State of the Union",
    "emails_easy_ham.txt": "emails (held out)",
}


def configs(calibration: str | None) -> dict[str, tuple[str, dict | None]]:
    """label -> (--kv-cache-dtype, --additional-config).

    nf4 serves with the model's calibration (``vllm-nf4kv calibrate MODEL`` first), and once
    without it for comparison, which the quality gate refuses on some models unless told.
    """
    calibrated = {"nf4kv": {"calibration": calibration}} if calibration else None
    return {
        "auto": ("auto", None),
        "fp8": ("fp8", None),
        "nf4": ("nf4", calibrated),
        "nf4 uncalibrated": ("nf4", {"nf4kv": {"calibration": "none", "accept_quality_risk": True}}),
    }


def served_calibration(llm) -> str:
    """Which calibration file an nf4 engine serves, and for which contexts (from its own resolution)."""
    from vllm_nf4kv.calibration import resolve

    config = llm.llm_engine.vllm_config
    model = config.model_config
    resolved = resolve(config.additional_config, model.hf_text_config, model.max_model_len)
    if resolved.calibration is None:
        return "none"
    return f"`{resolved.calibration.source}` (offsets for contexts up to {resolved.calibration.context})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / ".assets/models/smollm2-135m"))
    parser.add_argument("--texts", default=str(REPO / ".assets/texts"))
    parser.add_argument("--kv-memory-bytes", type=int, default=256 * 2**20)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--greedy-tokens", type=int, default=32)
    parser.add_argument("--calibration", help="nf4's calibration file (default: where servers look)")
    parser.add_argument(
        "--text-files", default="moby_dick.txt,sotu_2000_2021.txt", help="files in --texts, comma-separated"
    )
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args()

    from vllm import LLM

    files = [f.strip() for f in args.text_files.split(",") if f.strip()]
    texts = {TEXT_NAMES.get(f, f): (Path(args.texts) / f).read_text() for f in files}
    rows, reference, served = {}, None, "none"
    os.environ.pop("NF4KV_CALIBRATION", None)  # the server default: the model's file, if any
    for label, (dtype, additional_config) in configs(args.calibration).items():
        start = time.perf_counter()
        llm = LLM(
            model=args.model, kv_cache_dtype=dtype, enforce_eager=True, seed=0,
            kv_cache_memory_bytes=args.kv_memory_bytes, max_model_len=max(2048, args.window + 1),
            additional_config=additional_config or {},
        )
        if label == "nf4":
            served = served_calibration(llm)
        row = {"capacity": kv_capacity_tokens(llm)}
        for name, text in texts.items():
            row[name] = perplexity(llm, token_windows(llm, text, args.tokens, args.window))
        tokens = greedy_tokens(llm, GREEDY_PROMPTS, args.greedy_tokens)
        reference = reference or tokens
        row["greedy"] = greedy_agreement(reference, tokens)
        row["seconds"] = time.perf_counter() - start
        rows[label] = row
        del llm
        gc.collect()

    auto = rows["auto"]
    lines = [
        f"Model `{Path(args.model).name}`, vLLM CPU, same KV budget "
        f"{args.kv_memory_bytes / 2**20:.0f} MiB for every dtype; perplexity over the first "
        f"{args.tokens} tokens in windows of {args.window}; greedy agreement over "
        f"{len(GREEDY_PROMPTS)} prompts x {args.greedy_tokens} tokens vs auto. "
        f"nf4 calibration: {served}. {provenance('vllm_nf4kv', 'scripts/bench_vllm.py')}.",
        "",
        "| kv-cache-dtype | KV tokens | vs auto | "
        + " | ".join(f"PPL {n} | Δ vs auto" for n in texts)
        + " | greedy prefix agreement | identical continuations |",
        "|---|---|---|" + "---|---|" * len(texts) + "---|---|",
    ]
    for dtype, row in rows.items():
        cells = [dtype, f"{row['capacity']:,}", f"{row['capacity'] / auto['capacity']:.2f}x"]
        for name in texts:
            cells += [f"{row[name]:.3f}", f"{row[name] / auto[name] - 1:+.2%}"]
        g = row["greedy"]
        cells += [f"{g.prefix_fraction:.0%}", f"{g.exact}/{g.total}"]
        lines.append("| " + " | ".join(cells) + " |")
    command = "python scripts/bench_vllm.py " + " ".join(sys.argv[1:])
    lines += ["", f"Command: `{command.strip()}`"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
