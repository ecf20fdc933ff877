"""Decode attention per layer: the nf4 CPU kernels against vLLM's own bf16 CPU attention op.

What `--kv-cache-dtype auto` runs on vLLM CPU is ``torch.ops._C.cpu_attention_with_kv_cache``
over a bf16 paged cache (with the scheduler plan vLLM builds, KV split on as by default);
nf4 runs ``cpu_kernels.attention`` over its pages, queries rotated in and outputs rotated
back, the Python wrapper included. Both get the same batch (N sequences x L cached tokens,
one query each), the same threads, and enough distinct copies of the cache, cycled call by
call, that each call reads memory the previous calls did not (as each layer of an engine
step does): at least --cold-bytes of nf4 pages, so neither format is timed from a warm L3.

    OMP_NUM_THREADS=2 python scripts/bench_cpu_decode.py --out docs/results/cpu-decode-vs-bf16.md
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from provenance import provenance

from vllm_nf4kv import cpu_kernels
from vllm_nf4kv.format import format_for

# (name, head_dim, query heads, KV heads): the three models the project measures
SHAPES = {
    "smollm2": ("SmolLM2-135M", 64, 9, 3),
    "gemma3": ("Gemma-3-270m", 256, 4, 1),
    "qwen2": ("Qwen2.5-Coder-0.5B", 64, 14, 2),
}
BATCHES = [(1, 1024), (8, 1024), (1, 4096), (8, 4096), (1, 16384), (8, 16384), (1, 32768), (8, 32768)]


def timed(calls, repeats: int) -> float:
    """Best mean over `repeats` passes of every call in `calls` (ms per call)."""
    for call in calls:
        call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for call in calls:
            call()
        best = min(best, (time.perf_counter() - start) / len(calls))
    return best * 1e3


def vllm_bf16_attention(
    query, key_cache, value_cache, output, starts, lens, table
) -> tuple[Callable[[], None], str]:
    """vLLM CPU's bf16 attention over these tensors as its backend calls it (its scheduler plan,
    KV split on as by default): the call, and the ISA vLLM picked."""
    import vllm._custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    heads, head_dim = query.shape[1:]
    kv_heads, block_size = key_cache.shape[1:3]
    isa = _get_attn_isa(torch.bfloat16, block_size, head_dim, "auto")
    plan = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=lens.shape[0], num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, seq_lens=lens,
        dtype=torch.bfloat16, query_start_loc=starts, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=True,
    )

    def call() -> None:
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=output, query_start_loc=starts,
            seq_lens=lens, scale=head_dim**-0.5, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=table, softcap=0.0, scheduler_metadata=plan, s_aux=None,
        )

    return call, isa


def bf16_call(num_reqs: int, seq_len: int, head_dim: int, heads: int, kv_heads: int, block_size: int, gen):
    """One layer of vLLM's bf16 CPU decode attention, as its backend calls it."""
    per_req = -(-seq_len // block_size)
    cache = torch.randn(num_reqs * per_req, kv_heads, 2 * block_size, head_dim, generator=gen).bfloat16()
    key_cache, value_cache = cache.chunk(2, dim=2)
    table = torch.randperm(num_reqs * per_req, generator=gen).view(num_reqs, per_req).int()
    starts, lens = torch.arange(num_reqs + 1).int(), torch.full((num_reqs,), seq_len).int()
    query = torch.randn(num_reqs, heads, head_dim, generator=gen).bfloat16()
    return vllm_bf16_attention(query, key_cache, value_cache, torch.empty_like(query), starts, lens, table)


def nf4_call(num_reqs: int, seq_len: int, head_dim: int, heads: int, kv_heads: int, block_size: int, gen):
    """One layer of nf4 decode attention over pages the C++ store wrote."""
    layout = format_for("nf4", head_dim)
    per_req = -(-seq_len // block_size)
    num_blocks = num_reqs * per_req
    cache = torch.zeros(num_blocks, kv_heads, block_size, layout.cell_bytes, dtype=torch.uint8)
    kv = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen)
    cpu_kernels.store(cache, kv, kv, torch.arange(num_blocks * block_size), layout)
    table = torch.randperm(num_blocks, generator=gen).view(num_reqs, per_req).int()
    starts, lens = torch.arange(num_reqs + 1).int(), torch.full((num_reqs,), seq_len).int()
    query = torch.randn(num_reqs, heads, head_dim, generator=gen).bfloat16()
    return lambda: cpu_kernels.attention(query, cache, layout, starts, lens, table, head_dim**-0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold-bytes", type=int, default=96 * 2**20, help="nf4 pages cycled per measurement")
    parser.add_argument("--max-context", type=int, default=32768)
    parser.add_argument("--out")
    args = parser.parse_args()
    if not cpu_kernels.available():
        raise SystemExit("the C++ kernels are not available here (see the log)")
    gen = torch.Generator().manual_seed(0)
    lines = [
        f"Decode attention per layer, one query per sequence, {torch.get_num_threads()} thread(s), block "
        f"size {args.block_size}; each row cycles through copies of the cache holding >= "
        f"{args.cold_bytes >> 20} MiB of nf4 pages (both formats the same number of copies), best of "
        f"{args.repeats} passes. "
        f"{provenance('vllm_nf4kv', 'scripts/bench_cpu_decode.py')}.",
        "",
        "| model shape | sequences x context | vLLM bf16 (ms) | nf4 (ms) | nf4 / bf16 |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for key in args.shapes:
        name, head_dim, heads, kv_heads = SHAPES[key]
        cell = format_for("nf4", head_dim).cell_bytes
        for num_reqs, seq_len in (b for b in BATCHES if b[1] <= args.max_context):
            copies = max(1, -(-args.cold_bytes // (num_reqs * seq_len * kv_heads * cell)))
            shape = (num_reqs, seq_len, head_dim, heads, kv_heads, args.block_size, gen)
            bf16 = [bf16_call(*shape) for _ in range(copies)]
            nf4 = [nf4_call(*shape) for _ in range(copies)]
            bf16_ms = timed([call for call, _ in bf16], args.repeats)
            nf4_ms = timed(nf4, args.repeats)
            row = (f"| {name} ({heads}/{kv_heads} heads, d {head_dim}; bf16 ISA `{bf16[0][1]}`) | "
                   f"{num_reqs} x {seq_len:,} | {bf16_ms:.3f} | {nf4_ms:.3f} | {nf4_ms / bf16_ms:.2f}x |")
            print(row, flush=True)
            lines.append(row)
            del bf16, nf4
    if args.out:
        Path(args.out).write_text("```bash\nOMP_NUM_THREADS=2 python scripts/bench_cpu_decode.py\n```\n\n"
                                  + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
