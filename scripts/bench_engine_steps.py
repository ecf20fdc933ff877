"""Prefill, decode-step and workload time of one in-process vLLM engine per kv-cache dtype.

Separates the two costs that `vllm serve` mixes: the time to prefill N prompts
of L tokens (one token generated), and the time per decode step with those N
sequences running (a second run generating more tokens, minus the first).
Prefix caching is off so both runs prefill; with ``--repeats K`` it is on instead, the
prompts are prefilled cold once (the prefill time), and the decode steps are timed K times as
the difference between a run generating 1 + S tokens and one generating 1 token, both finding
the prompts cached (median, min and max of the K). Single process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so no API server shares the cores.

``--output-tokens K`` instead times the whole KV-bound workload in the engine
alone: N prompts of L tokens, K output tokens each (ignore_eos), the engine's own
scheduler deciding how many run at once within --kv-memory-bytes; reported as
output tokens/s, the in-process counterpart of bench_serve.py's kv-bound row.
``--capacity-control`` then also runs auto with the KV bytes that hold as many
tokens as nf4's cache: what nf4's capacity alone buys at auto's kernel costs.

    python scripts/bench_engine_steps.py [--dtypes auto nf4] [--prompts 8] [--prompt-tokens 1000]
    python scripts/bench_engine_steps.py --prompts 16 --output-tokens 256 --kv-memory-bytes 67108864 \
        --capacity-control
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def generate_seconds(llm, prompts, max_tokens: int) -> float:
    """Seconds `llm` takes to generate exactly `max_tokens` for each of `prompts`."""
    from vllm import SamplingParams

    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["auto", "nf4"])
    parser.add_argument("--model", default=str(REPO / ".assets/models/smollm2-135m"))
    parser.add_argument("--text", default=str(REPO / ".assets/texts/moby_dick.txt"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1,
                        help="> 1: prefix caching on; after the cold prefill, the decode steps timed this "
                             "many times on the cached prompts (median, min, max)")
    parser.add_argument("--output-tokens", type=int, help="time the whole workload instead (see above)")
    parser.add_argument("--kv-memory-bytes", type=int, default=256 * 2**20)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--capacity-control", action="store_true",
                        help="with --output-tokens: after nf4, run auto with as many KV tokens as nf4 had")
    args = parser.parse_args()
    if args.capacity_control and ("nf4" not in args.dtypes or not args.output_tokens):
        parser.error("--capacity-control needs nf4 among --dtypes and --output-tokens")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from bench_serve import CAPACITY_CONTROL, auto_bytes_per_token
    from provenance import provenance
    from vllm import LLM, SamplingParams, TokensPrompt

    source = provenance("vllm_nf4kv", "scripts/bench_engine_steps.py")
    print(f"# {Path(args.model).name}, {source}", flush=True)
    runs = [(dtype, dtype, args.kv_memory_bytes) for dtype in args.dtypes]
    for label, dtype, kv_bytes in runs:
        llm = LLM(model=args.model, kv_cache_dtype=dtype, enforce_eager=True, seed=0,
                  kv_cache_memory_bytes=kv_bytes, max_model_len=args.max_model_len,
                  enable_prefix_caching=args.repeats > 1)
        cache = llm.llm_engine.vllm_config.cache_config
        kv_tokens = cache.num_gpu_blocks * cache.block_size
        if args.capacity_control and dtype == "nf4":
            runs.append((CAPACITY_CONTROL, "auto", kv_tokens * auto_bytes_per_token(Path(args.model))))
        ids = llm.get_tokenizer().encode(Path(args.text).read_text())
        n = args.prompt_tokens
        prompts = [TokensPrompt(prompt_token_ids=ids[i * n : (i + 1) * n]) for i in range(args.prompts)]
        warm_up = TokensPrompt(prompt_token_ids=ids[-n:])  # not one of the prompts: they must start cold
        llm.generate([warm_up], SamplingParams(max_tokens=2), use_tqdm=False)
        if args.output_tokens:
            out = args.output_tokens
            start = time.perf_counter()
            llm.generate(prompts, SamplingParams(max_tokens=out, ignore_eos=True), use_tqdm=False)
            wall = time.perf_counter() - start
            print(f"{label} ({kv_tokens:,} KV tokens): {args.prompts} x ({n} prompt + {out} output) tokens "
                  f"in {wall:.1f} s, {args.prompts * out / wall:.1f} output tok/s")
            del llm
            continue
        prefill = generate_seconds(llm, prompts, 1)
        longer = 1 + args.decode_steps
        if args.repeats == 1:  # a second cold run: its decode steps are what it adds
            steps = [(generate_seconds(llm, prompts, longer) - prefill) / args.decode_steps]
        else:  # the prompts are cached now: both runs of a pair recompute one token per prompt
            pairs = [(generate_seconds(llm, prompts, longer), generate_seconds(llm, prompts, 1))
                     for _ in range(args.repeats)]
            steps = [(long_run - short_run) / args.decode_steps for long_run, short_run in pairs]
        spread = ""
        if len(steps) > 1:
            spread = f" (min {min(steps) * 1e3:.0f}, max {max(steps) * 1e3:.0f}, {len(steps)} runs)"
        print(f"{label}: prefill {args.prompts} x {n} tokens {prefill:.2f} s; decode step with "
              f"{args.prompts} sequences {statistics.median(steps) * 1e3:.0f} ms{spread}", flush=True)
        del llm


if __name__ == "__main__":
    main()
