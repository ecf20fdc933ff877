"""One attention layer's calls in a step, nf4 against vLLM's bf16, as the backends make them.

Where attention is a small part of a step (short contexts: issue 27's "not KV-bound" workload),
what decides nf4's step time is what each layer costs around the kernels; in a prefill, the store
(rotations and the scale search) beside the attention. Per layer and step, store and attention
timed apart, in-process, with the batch's tensors as vLLM hands them (bf16 queries, K/V strided
views of the qkv projection, the output to write, the layer's calibration tables):

- ``bf16``: vLLM CPU's ``cpu_attn_reshape_and_cache`` + ``cpu_attention_with_kv_cache``;
- ``nf4``: what the CPU backend calls, ``LayoutKernels.store`` + ``.attention`` with the
  calibration applied inside the ops, writing vLLM's output in place;
- ``nf4, transform in PyTorch``: the same ops the way the backend called them before
  (``KVTransform`` on K, V, queries and outputs in PyTorch, fp32 copies, an fp32 output copied
  into vLLM's): the same bytes and bits (tests/test_cpu_kernels.py), more Python.

    OMP_NUM_THREADS=2 python scripts/bench_layer_calls.py --out docs/results/layer-calls.md
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_cpu_decode import vllm_bf16_attention
from provenance import provenance

from vllm_nf4kv import cpu_kernels
from vllm_nf4kv.format import format_for
from vllm_nf4kv.kv_transform import KVTransform

SHAPE = ("SmolLM2-135M", 64, 9, 3)  # name, head_dim, query heads, KV heads
# (sequences, tokens of context, new tokens a sequence): decode steps, then one prompt's prefill
STEPS = [(2, 128, 1), (2, 512, 1), (8, 128, 1), (8, 512, 1), (1, 1000, 1000)]
BLOCK_SIZE = 128


def per_call_us(call: Callable[[], object], seconds: float, repeats: int) -> float:
    """Best of `repeats` means over as many calls as take about `seconds` (us per call)."""
    start = time.perf_counter()
    call()
    calls = max(3, int(seconds / max(time.perf_counter() - start, 1e-7)))
    for _ in range(max(1, calls // 10)):
        call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


Calls = dict[str, tuple[Callable[[], None], Callable[[], None]]]  # label -> (store, attend)


def layer_calls(num_reqs: int, context: int, new: int, gen: torch.Generator) -> Calls:
    import vllm._custom_ops as ops

    _, head_dim, heads, kv_heads = SHAPE
    per_req = -(-context // BLOCK_SIZE)
    num_blocks = num_reqs * per_req
    table = torch.arange(num_blocks, dtype=torch.int32).view(num_reqs, per_req)
    starts = torch.arange(0, num_reqs * new + 1, new, dtype=torch.int32)
    lens = torch.full((num_reqs,), context, dtype=torch.int32)
    positions = torch.arange(context - new, context)  # this step's tokens
    slots = (table[:, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE).flatten()
    tokens = num_reqs * new
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).bfloat16()
    widths = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    query, key, value = (part.view(tokens, -1, head_dim) for part in qkv.split(widths, dim=-1))
    output = torch.empty(tokens, heads, head_dim, dtype=torch.bfloat16)
    scale = head_dim**-0.5

    bf16 = torch.randn(2, num_blocks, kv_heads, BLOCK_SIZE, head_dim, generator=gen).bfloat16()
    bf16_attend, isa = vllm_bf16_attention(query, bf16[0], bf16[1], output, starts, lens, table)

    def bf16_store() -> None:
        ops.cpu_attn_reshape_and_cache(key, value, bf16[0], bf16[1], slots, isa)

    layout = format_for("nf4", head_dim)
    cache = torch.zeros(num_blocks, kv_heads, BLOCK_SIZE, layout.cell_bytes, dtype=torch.uint8)
    filler = torch.randn(num_blocks * BLOCK_SIZE, kv_heads, head_dim, generator=gen)
    cpu_kernels.store(cache, filler, filler, torch.arange(num_blocks * BLOCK_SIZE), layout)
    transform = KVTransform(
        torch.rand(kv_heads, head_dim, generator=gen) + 0.5, torch.randn(kv_heads, head_dim, generator=gen),
        torch.randn(kv_heads, head_dim, generator=gen), heads,
    )
    transform.move_to(torch.device("cpu"))
    kernels = cpu_kernels.LayoutKernels(layout)
    metadata = (starts, lens, table)

    def nf4_store() -> None:
        kernels.store(cache, key, value, slots, **transform.store_tables(cache.device))

    def nf4_attend() -> None:
        kernels.attention(
            query, cache, *metadata, scale, True, None, out=output, **transform.attention_tables(cache.device)
        )

    def store_after_pytorch_transform() -> None:
        keys, values = transform.keys(key).float().contiguous(), transform.values(value).float().contiguous()
        kernels.store(cache, keys, values, slots)

    def attend_between_pytorch_transforms() -> None:
        result = kernels.attention(transform.queries(query).float().contiguous(), cache, *metadata, scale)
        output[:] = transform.outputs(result)

    return {
        "bf16": (bf16_store, bf16_attend),
        "nf4": (nf4_store, nf4_attend),
        "nf4, transform in PyTorch": (store_after_pytorch_transform, attend_between_pytorch_transforms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.3, help="per timed pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    if not cpu_kernels.available():
        raise SystemExit("the C++ kernels are not available here (see the log)")
    gen = torch.Generator().manual_seed(0)
    name, head_dim, heads, kv_heads = SHAPE
    lines = [
        f"One attention layer of a step (store the step's K/V, then attend), {name}'s shape ({heads}/"
        f"{kv_heads} heads, d {head_dim}), bf16 model tensors, block size {BLOCK_SIZE}, "
        f"{torch.get_num_threads()} thread(s); us per call, best of {args.repeats} means over "
        f"~{args.seconds} s of calls. {provenance('vllm_nf4kv', 'scripts/bench_layer_calls.py')}.",
        "",
        "| step | bf16 store + attention | nf4 store + attention | nf4 / bf16 | nf4, transform in PyTorch |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for num_reqs, context, new in STEPS:
        timings = {
            label: tuple(per_call_us(call, args.seconds, args.repeats) for call in calls)
            for label, calls in layer_calls(num_reqs, context, new, gen).items()
        }
        bf16, nf4, pytorch = (timings[k] for k in ("bf16", "nf4", "nf4, transform in PyTorch"))
        step = f"decode {num_reqs} x {context}" if new == 1 else f"prefill {num_reqs} x {new}"
        row = (f"| {step} | {bf16[0]:.1f} + {bf16[1]:.1f} | {nf4[0]:.1f} + {nf4[1]:.1f} | "
               f"{sum(nf4) / sum(bf16):.2f}x | {pytorch[0]:.1f} + {pytorch[1]:.1f} |")
        print(row, flush=True)
        lines.append(row)
    if args.out:
        command = "OMP_NUM_THREADS=2 python scripts/bench_layer_calls.py --out docs/results/layer-calls.md"
        Path(args.out).write_text(f"```bash\n{command}\n```\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
