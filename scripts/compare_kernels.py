"""Prove that this tree's C++ kernels write the same bytes and give the same attention bits as REV's.

Why: the kernels change shape (files, names, where constants come from) under the promise that
no bit changes; the tests check each build against the reference, this checks the bits against
the previous code itself, on inputs chosen to reach every branch: head_dim 64/128/256 and a
non-default layout (K groups of 16, V groups of 32), K/V over many octaves with NaN, +-inf, 1e30
and 1e-30 entries, GQA 1/3/8, block sizes 16/128, decodes, a prefill and prefill chunks, with and
without a sliding window.

How: ``git archive REV vllm_nf4kv`` into a temporary directory; the probe below (this file with
``--probe``) runs in one process with ``PYTHONPATH`` at that copy and in another at this tree.
Each builds its own kernels (native and ``-march=x86-64-v3``, cached by their own sources) and
saves the reference's cache bytes, the C++ store's bytes and the attention outputs to a ``.pt``
file; every tensor is then compared bit for bit. Exits 1 on any difference.

    python scripts/compare_kernels.py [--against REV]   # default HEAD
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PORTABLE = "-march=x86-64-v3"

# (name, head_dim, (key group, value group) or None for the default layout). Per-group ue5m3 rows
# only, as every revision can store them: the default layout became two-level keys after c584f97
# (a format change, so default-layout bits differ from older revisions by design; the tests hold
# the two-level rows to the reference).
LAYOUTS = [
    ("d64 g16", 64, (16, 16)),
    ("d128 g32", 128, (32, 32)),
    ("d256 g64", 256, (64, 64)),
    ("d128 k16/v32", 128, (16, 32)),
]
GQA_RATIOS = [1, 3, 8]
NUM_KV_HEADS = 2
BLOCK_SIZES = [16, 128]
# per request: tokens in the cache and this step's queries (decode, decode, a 7-token chunk after
# 123, decode, a whole 9-token prefill, a 70-token chunk after 130)
SEQ_LENS = [1, 37, 130, 20, 9, 200]
QUERY_LENS = [1, 1, 7, 1, 9, 70]
# (name, causal, sliding window)
ATTENTION_VARIANTS = [("causal", True, None), ("window 33", True, 33), ("bidirectional", False, None)]


# ---------------------------------------------------------------- the probe (runs in REV's or this tree)


def _layout(head_dim: int, groups: tuple[int, int] | None):
    from vllm_nf4kv import format as fmt

    if groups is not None:
        return fmt.CellLayout(fmt.RowFormat(head_dim, groups[0]), fmt.RowFormat(head_dim, groups[1]))
    format_for = getattr(fmt, "format_for", None)  # older revisions: CellLayout.for_head_dim
    return format_for("nf4", head_dim) if format_for is not None else fmt.CellLayout.for_head_dim(head_dim)


def _key_values(gen: torch.Generator, num_tokens: int, heads: int, head_dim: int) -> torch.Tensor:
    """[num_tokens, heads, head_dim] fp32 over ~70 octaves, with non-finite and extreme entries."""
    x = torch.randn(num_tokens, heads, head_dim, generator=gen)
    x = x * 2.0 ** torch.randint(-40, 21, (num_tokens, heads, 1), generator=gen)  # per vector
    x = x * 2.0 ** torch.randint(-6, 7, (num_tokens, heads, head_dim), generator=gen)  # per element
    flat = x.view(-1)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1e-30, -1e-30, 0.0])
    where = torch.randperm(flat.numel(), generator=gen)[: 4 * len(specials)]
    flat[where] = specials.repeat(4)
    x[0, 0] = 0.0  # an all-zero vector: every group stores the zero code
    return x


def _case(gen: torch.Generator, head_dim: int, groups, ratio: int, block_size: int):
    layout = _layout(head_dim, groups)
    blocks_per_req = [-(-n // block_size) for n in SEQ_LENS]
    num_blocks = sum(blocks_per_req) + 3
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(SEQ_LENS), max(blocks_per_req), dtype=torch.int32)
    slots, used = [], 0
    for r, (n, nb) in enumerate(zip(SEQ_LENS, blocks_per_req, strict=True)):
        table[r, :nb] = order[used : used + nb]
        used += nb
        slots += [int(table[r, t // block_size]) * block_size + t % block_size for t in range(n)]
    slots.append(-1)  # a padding token: skipped
    slots = torch.tensor(slots)
    key = _key_values(gen, len(slots), NUM_KV_HEADS, head_dim)
    value = _key_values(gen, len(slots), NUM_KV_HEADS, head_dim)
    starts = torch.tensor([0, *torch.tensor(QUERY_LENS).cumsum(0).tolist()])
    query = torch.randn(int(starts[-1]), NUM_KV_HEADS * ratio, head_dim, generator=gen)
    cache = torch.zeros(num_blocks, NUM_KV_HEADS, block_size, layout.cell_bytes, dtype=torch.uint8)
    return layout, cache, key, value, slots, query, starts, torch.tensor(SEQ_LENS), table


def probe(out: Path) -> None:
    """Every tensor the comparison looks at, from whichever vllm_nf4kv PYTHONPATH points at."""
    import vllm_nf4kv
    from vllm_nf4kv import cpu_kernels, reference

    print(f"probe: vllm_nf4kv from {Path(vllm_nf4kv.__file__).parent}", flush=True)
    builds = {"native": cpu_kernels.build(), "portable": cpu_kernels.build("nf4kv_cpu_portable", PORTABLE)}
    results: dict[str, dict[str, torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(0)
    for name, head_dim, groups in LAYOUTS:
        for ratio in GQA_RATIOS:
            for block_size in BLOCK_SIZES:
                layout, empty, key, value, slots, query, starts, lens, table = _case(
                    gen, head_dim, groups, ratio, block_size
                )
                tensors = {"reference bytes": empty.clone()}
                reference.write_paged(tensors["reference bytes"], key, value, slots, layout)
                for build, ops in builds.items():
                    tensors[f"store {build}"] = empty.clone()
                    cpu_kernels.store(tensors[f"store {build}"], key, value, slots, layout, ops=ops)
                    for variant, causal, window in ATTENTION_VARIANTS:
                        tensors[f"attention {build}, {variant}"] = cpu_kernels.attention(
                            query, tensors["reference bytes"], layout, starts, lens, table,
                            head_dim**-0.5, causal, window, ops=ops,
                        )
                results[f"{name} gqa{ratio} bs{block_size}"] = tensors
    torch.save({"has_avx512": bool(builds["native"].has_avx512()), "results": results}, out)


# ---------------------------------------------------------------- the comparison


def run_probe(root: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, __file__, "--probe", str(out), "--root", str(root)], env=env, check=True)
    return torch.load(out)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():  # compare bit patterns: NaN == NaN, -0.0 != 0.0
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    return torch.equal(a, b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", metavar="REV", help="git revision to compare with")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe is not None:
        import vllm_nf4kv

        if args.root is not None and Path(vllm_nf4kv.__file__).resolve().parents[1] != args.root.resolve():
            raise SystemExit(f"probe imported {vllm_nf4kv.__file__}, not the copy under {args.root}")
        probe(args.probe)
        return

    with tempfile.TemporaryDirectory(prefix="nf4kv_compare_") as tmp:
        old_root = Path(tmp) / "old"
        old_root.mkdir()
        archive = subprocess.run(
            ["git", "archive", args.against, "vllm_nf4kv"], cwd=REPO, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(old_root)], input=archive, check=True)
        old = run_probe(old_root, Path(tmp) / "old.pt")
        new = run_probe(REPO, Path(tmp) / "new.pt")

    columns = ["reference bytes", "store native", "store portable", "attention native", "attention portable"]
    rows, failures = [], []
    for case, want in old["results"].items():
        got = new["results"].get(case, {})
        verdict = {}
        for column in columns:
            names = [name for name in want if name.startswith(column)]
            equal = [name in got and same_bits(got[name], want[name]) for name in names]
            failures += [f"{case}: {name}" for name, ok in zip(names, equal, strict=True) if not ok]
            verdict[column] = "yes" if names and all(equal) else "NO"
        rows.append((case, verdict))
    build = "AVX-512" if new["has_avx512"] else "portable loops only (no AVX-512 here)"
    print(f"\nthis tree vs {args.against}, bit for bit (native build: {build}; attention: "
          f"{', '.join(v[0] for v in ATTENTION_VARIANTS)})\n")
    print("| case | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for case, verdict in rows:
        print(f"| {case} | " + " | ".join(verdict[c] for c in columns) + " |")
    if failures:
        print("\nDIFFERENT:\n  " + "\n  ".join(failures))
        raise SystemExit(1)
    print(f"\nall {len(rows)} cases: same bytes and same attention bits as {args.against}")


if __name__ == "__main__":
    main()
