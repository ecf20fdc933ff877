"""What the calibration transform costs beside the nf4 kernels, per layer call (CPU, one thread).

    .venv/bin/python scripts/bench_transform.py [--out docs/results/transform-cost.md]

The backends apply ``kv_transform.KVTransform`` around the C++ kernels: ``(k - c) * d`` and
``v - mu`` before the store, ``q / d`` before attention, ``+ mu`` after it. This times those four
elementwise ops against the store and attention kernels on the same shapes (SmolLM2: 9 query
heads, 3 KV heads, head_dim 64; Qwen2.5-Coder-0.5B: 14 and 2), for a decode step of 8 sequences
at 4,096 tokens of context and for a 1,024-token prefill. Medians of repeated calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vllm_nf4kv import cpu_kernels  # noqa: E402
from vllm_nf4kv.format import format_for  # noqa: E402
from vllm_nf4kv.kv_transform import KVTransform  # noqa: E402

BLOCK = 16
STEPS = (("decode, 8 x 4,096", 8, 4096, 1), ("prefill 1,024", 1, 1024, 1024))  # label, seqs, context, new


def median_ms(fn, repeats: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def case(heads: int, kv_heads: int, dim: int, seqs: int, context: int, query_len: int) -> dict[str, float]:
    layout = format_for("nf4", dim)
    gen = torch.Generator().manual_seed(0)
    blocks_per_seq = context // BLOCK
    cache = torch.zeros(seqs * blocks_per_seq, kv_heads, BLOCK, layout.cell_bytes, dtype=torch.uint8)
    block_table = torch.arange(seqs * blocks_per_seq, dtype=torch.int32).view(seqs, blocks_per_seq)
    for s in range(seqs):  # fill every sequence's context
        k = torch.randn(context, kv_heads, dim, generator=gen)
        slots = block_table[s].repeat_interleave(BLOCK) * BLOCK + torch.arange(context) % BLOCK
        cpu_kernels.store(cache, k, k, slots.long(), layout)
    tokens = seqs * query_len
    q = torch.randn(tokens, heads, dim, generator=gen).bfloat16()
    k = torch.randn(tokens, kv_heads, dim, generator=gen).bfloat16()
    last = block_table[:, -1:] * BLOCK + BLOCK - 1  # each sequence's last slot: where its new token goes
    slots = last.repeat_interleave(query_len, 0).flatten()[:tokens].long()
    query_start_loc = torch.arange(seqs + 1, dtype=torch.int32) * query_len
    seq_lens = torch.full((seqs,), context, dtype=torch.int32)
    ones = torch.ones(kv_heads, dim)
    transform = KVTransform(ones * 1.5, torch.randn(kv_heads, dim), torch.randn(kv_heads, dim), heads)

    def ops() -> None:
        transform.keys(k), transform.values(k)
        transform.outputs(torch.empty(tokens, heads, dim).copy_(transform.queries(q)))

    return {
        "transform": median_ms(ops),
        "store": median_ms(lambda: cpu_kernels.store(cache, k, k, slots, layout)),
        "attention": median_ms(
            lambda: cpu_kernels.attention(
                q, cache, layout, query_start_loc, seq_lens, block_table, dim**-0.5, True
            )
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for model, heads, kv_heads in (("SmolLM2-135M", 9, 3), ("Qwen2.5-Coder-0.5B", 14, 2)):
        for label, seqs, context, query_len in STEPS:
            t = case(heads, kv_heads, 64, seqs, context, query_len)
            share = t["transform"] / (t["store"] + t["attention"])
            times = (f"{t[x]:.3f}" for x in ("transform", "store", "attention"))
            cells = [model, label, *times, f"{share:.1%}"]
            rows.append("| " + " | ".join(cells) + " |")
    lines = [
        "Calibration transform vs the nf4 C++ kernels, per layer call, one thread, milliseconds (median).",
        "",
        "| model shape | step | transform (4 ops) | store | attention | transform / kernels |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Command: `{' '.join(['python scripts/bench_transform.py', *sys.argv[1:]])}`",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
