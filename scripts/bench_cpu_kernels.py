"""Time the C++ CPU kernels against the PyTorch reference path, side by side.

For decode (N requests x L cached tokens), prefill (one request of L tokens)
and quantize-on-write, on SmolLM2-135M's attention shape (9 query / 3 KV heads,
head_dim 64) by default. Prints a markdown table; ratios are measured in the
same process, back to back (timings on shared CPUs are noisy, ratios less so).

    python scripts/bench_cpu_kernels.py [--threads 1] [--out docs/...md]
    python scripts/bench_cpu_kernels.py --against 0c79e6f --threads 2   # kernels of a commit vs these

``--against REV`` times the kernels as they were at git revision REV instead of
the PyTorch path (REV's ``vllm_nf4kv/csrc``, whatever files it held, built beside the
current ones with the same flags), and says whether the two write the same cache bytes
and give the same attention bits (``scripts/compare_kernels.py`` checks that on many
more inputs).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from vllm_nf4kv import cpu_kernels
from vllm_nf4kv.format import SCALE_CODE_MAX, CellLayout, RowFormat, format_for
from vllm_nf4kv.paged_attention import ATTENTION_DTYPE, paged_attention
from vllm_nf4kv.reference import check_paged_cache, decode_scale, nf4_levels, nf4_midpoints, write_paged
from vllm_nf4kv.rotation import rotate, rotation_signs, unrotate


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def kernels_at(rev: str) -> Any:
    """torch.ops namespace of the C++ kernels as committed at `rev` (its whole csrc/ directory)."""
    repo = Path(__file__).resolve().parents[1]

    def git(*argv: str) -> bytes:
        return subprocess.run(["git", *argv], cwd=repo, check=True, capture_output=True).stdout

    namespace = "nf4kv_at_" + git("rev-parse", "--short", rev).decode().strip()
    root = Path(tempfile.mkdtemp())
    subprocess.run(["tar", "-x", "-C", str(root)], input=git("archive", rev, "vllm_nf4kv/csrc"), check=True)
    return cpu_kernels.build(namespace, source=root / "vllm_nf4kv" / "csrc")


def _arguments(op: Any) -> list[str]:
    return [argument.name for argument in op.default._schema.arguments]


def per_group_only(ops: Any) -> bool:
    """Whether `ops` predate two-level rows (their ops take a group size per row and nothing else)."""
    return "key_relative_bits" not in _arguments(ops.store)


def takes_model_tensors(ops: Any) -> bool:
    """Whether `ops` take K/V/queries in the model's dtype, the calibration and an output to write."""
    return "key_offset" in _arguments(ops.store)


def previous_layout(head_dim: int) -> CellLayout:
    """What ``--kv-cache-dtype nf4`` stored before two-level key rows: ``D / 4`` ue5m3 groups, K and V."""
    row = RowFormat(head_dim, max(16, head_dim // 4))
    return CellLayout(row, row)


def _rows_of(ops: Any, layout: CellLayout) -> tuple:
    """The rows' arguments in `ops`' signature: a group size each, or (group, bits, ladder) each."""
    if per_group_only(ops):
        return layout.key.group_size, layout.value.group_size
    return (*cpu_kernels._row_args(layout.key), *cpu_kernels._row_args(layout.value))


def attention_of(ops: Any) -> Callable[..., torch.Tensor]:
    """``attention(query, cache, layout, starts, lens, table, scale)`` through `ops`, any signature.

    Revisions before :class:`cpu_kernels.LayoutKernels` took contiguous fp32 queries and a
    zeroed fp32 output, as the wrapper of their day made them (that conversion is timed too).
    """
    if takes_model_tensors(ops):
        return partial(cpu_kernels.attention, ops=ops)
    levels, scales = nf4_levels(), decode_scale(torch.arange(SCALE_CODE_MAX + 1)).contiguous()

    def attention(query, cache, layout, starts, lens, table, scale):
        query = query.float().contiguous()
        out = torch.zeros_like(query)
        ops.attention(
            query, cache, table.int().contiguous(), rotation_signs(layout.head_dim), lens.int().contiguous(),
            starts.int().contiguous(), levels, scales, float(scale), True, 0, *_rows_of(ops, layout), out,
        )
        return out

    return attention


def store_of(ops: Any) -> Callable[..., None]:
    """``store(cache, key, value, slots, layout)`` through `ops`, whichever op signature its revision has.

    Revisions before per-row search steps take one ``search_steps`` for K and V; revisions
    before two-level rows take a group size per row; revisions before
    :class:`cpu_kernels.LayoutKernels` take contiguous fp32 K and V.
    """
    if takes_model_tensors(ops):
        return partial(cpu_kernels.store, ops=ops)
    arguments = _arguments(ops.store)
    tables = nf4_levels(), nf4_midpoints(), decode_scale(torch.arange(SCALE_CODE_MAX + 1)).contiguous()

    def store(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
              layout: CellLayout) -> None:
        if "search_steps" in arguments and layout.key.search_steps != layout.value.search_steps:
            raise ValueError("this revision's store takes one search_steps for K and V")
        check_paged_cache(cache, layout)  # as that revision's cpu_kernels.store did
        steps = (layout.key.search_steps,) if "search_steps" in arguments else (
            layout.key.search_steps, layout.value.search_steps)
        ops.store(
            key.float().contiguous(), value.float().contiguous(), cache, slots.long().contiguous(),
            rotation_signs(layout.head_dim), *tables, *_rows_of(ops, layout), *steps,
        )

    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--against", metavar="REV", help="compare with the kernels at this git revision")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_kernels.available():
        raise SystemExit("the C++ kernels are not available here (see the log)")
    layout = format_for("nf4", args.head_dim)
    gen = torch.Generator().manual_seed(0)
    num_blocks = 8192 // args.block_size * 16
    cache = torch.zeros(num_blocks, args.kv_heads, args.block_size, layout.cell_bytes, dtype=torch.uint8)
    tokens = num_blocks * args.block_size
    kv = torch.randn(tokens, args.kv_heads, args.head_dim, generator=gen, dtype=torch.float32).bfloat16()
    cpu_kernels.store(cache, kv, kv, torch.arange(tokens), layout)  # realistic codes and scales
    before = kernels_at(args.against) if args.against else None
    # a revision before two-level rows served another layout (same bytes a cell): time it on that
    older = before is not None and per_group_only(before)
    before_layout = previous_layout(args.head_dim) if older else layout
    before_cache = cache
    if before_layout != layout:
        before_cache = torch.zeros_like(cache)
        store_of(before)(before_cache, kv, kv, torch.arange(tokens), before_layout)
    same_bits, same_bytes = [], []

    def attention_pair(num_reqs: int, seq_len: int, q_len: int) -> tuple[float, float]:
        per_req = -(-seq_len // args.block_size)
        table = torch.randperm(num_blocks, generator=gen)[: num_reqs * per_req].view(num_reqs, per_req).int()
        starts = torch.arange(num_reqs + 1) * q_len
        lens = torch.full((num_reqs,), seq_len)
        query = torch.randn(num_reqs * q_len, args.heads, args.head_dim, generator=gen).bfloat16()
        scale = args.head_dim**-0.5
        metadata = (starts, lens, table, scale)

        def fast() -> object:
            return cpu_kernels.attention(query, cache, layout, *metadata)

        def slow() -> object:
            if before is not None:
                return attention_of(before)(query, before_cache, before_layout, *metadata)
            return unrotate(paged_attention(rotate(query, ATTENTION_DTYPE), cache, layout, *metadata))

        if before is not None and before_layout == layout:
            same_bits.append(torch.equal(fast(), slow()))
        slow_repeats = args.repeats if before is not None else max(1, args.repeats // 2)
        return best_of(fast, args.repeats), best_of(slow, slow_repeats)

    rows = []
    for num_reqs, seq_len in [(1, 1024), (8, 1024), (8, 4096), (32, 2048)]:
        rows.append((f"decode, {num_reqs} x {seq_len} tokens", *attention_pair(num_reqs, seq_len, 1)))
    for seq_len in (512, 2048):
        rows.append((f"prefill, 1 x {seq_len} tokens", *attention_pair(1, seq_len, seq_len)))
    slow_store = write_paged if before is None else store_of(before)
    for n in (1, 8, 2048):
        key = torch.randn(n, args.kv_heads, args.head_dim, generator=gen).bfloat16()
        slots = torch.randperm(tokens, generator=gen)[:n]
        if before is not None and before_layout == layout:
            mine, theirs = cache.clone(), cache.clone()
            cpu_kernels.store(mine, key, key, slots, layout)
            slow_store(theirs, key, key, slots, layout)
            same_bytes.append(torch.equal(mine, theirs))
        fast = best_of(lambda: cpu_kernels.store(cache, key, key, slots, layout), args.repeats)  # noqa: B023
        slow = best_of(
            lambda: slow_store(before_cache, key, key, slots, before_layout), args.repeats  # noqa: B023
        )
        rows.append((f"store (quantize-on-write), {n} tokens", fast, slow))

    baseline = f"kernels at {args.against}" if before is not None else "PyTorch path"
    build = "AVX-512" if cpu_kernels.build().has_avx512() else "portable"
    lines = [
        f"{args.heads} query / {args.kv_heads} KV heads, head_dim {args.head_dim}, block size "
        f"{args.block_size}, {args.threads} thread(s), C++ build: {build}; best of {args.repeats}",
        "",
        f"| operation (one layer) | C++ kernels (ms) | {baseline} (ms) | speedup |",
        "|---|---|---|---|",
    ]
    digits = 1 if before is None else 2
    lines += [f"| {name} | {t:.3f} | {u:.3f} | {u / t:.{digits}f}x |" for name, t, u in rows]
    if before is not None and before_layout != layout:
        lines += [
            "",
            f"{args.against} is timed on the layout it served ({before_layout.key.spec} for K and V), "
            f"these kernels on theirs ({layout.key.spec} / {layout.value.spec}), both {layout.cell_bytes} "
            "bytes a cell: outputs differ by design, bits are not compared",
        ]
    elif before is not None:
        same = "yes" if all(same_bits) else "NO"
        lines += ["", f"Attention outputs bit-identical to {args.against}'s: {same}"]
        same = "yes" if all(same_bytes) else "NO"
        lines += [f"Stored cache bytes identical to {args.against}'s: {same}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
