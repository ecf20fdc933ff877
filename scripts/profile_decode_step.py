"""Decode steps of one long prompt in an in-process engine: time per step, then where it goes (cProfile).

bench_engine_steps.py times decode steps on prompts served again from the prefix cache; this
one prefills a single prompt once (prefix caching off), lets the decode settle, times steps with
no profiler, then profiles as many more and prints the ops that took the time (the attention op
of the dtype among them). A cross-check of a surprising engine-step figure.

    OMP_NUM_THREADS=2 python scripts/profile_decode_step.py --model .assets/models/gemma3-270m \\
        --dtype nf4 --prompt-tokens 32000
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from pathlib import Path

from provenance import provenance

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: profilable

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / ".assets/models/smollm2-135m"))
    parser.add_argument("--dtype", default="nf4")
    parser.add_argument("--prompt-tokens", type=int, default=8000)
    parser.add_argument("--text", default=str(REPO / ".assets/texts/moby_dick.txt"))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--kv-memory-bytes", type=int, default=4 << 30)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(
        model=args.model, kv_cache_dtype=args.dtype, enforce_eager=True, seed=0,
        kv_cache_memory_bytes=args.kv_memory_bytes, max_model_len=args.prompt_tokens + 8 * args.steps,
        enable_prefix_caching=False,
    )
    ids = llm.get_tokenizer().encode(Path(args.text).read_text())
    ids = (ids * (args.prompt_tokens // len(ids) + 1))[: args.prompt_tokens]
    engine = llm.llm_engine
    engine.add_request("0", TokensPrompt(prompt_token_ids=ids), SamplingParams(max_tokens=6 * args.steps,
                                                                              ignore_eos=True))
    start = time.perf_counter()
    while not any(out.outputs and out.outputs[0].token_ids for out in engine.step()):
        pass
    prefill = time.perf_counter() - start
    for _ in range(4):  # settle
        engine.step()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    plain = (time.perf_counter() - start) / args.steps
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.steps):
        engine.step()
    profile.disable()
    print(f"# {Path(args.model).name} {args.dtype}, {args.prompt_tokens} prompt tokens, "
          f"{provenance('vllm_nf4kv', 'scripts/profile_decode_step.py')}")
    print(f"prefill {prefill:.2f} s; decode step {plain * 1e3:.1f} ms (mean of {args.steps}, no profiler)")
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
