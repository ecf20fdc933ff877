#!/usr/bin/env python3
"""Benchmark the NF4 Triton kernels on a CUDA GPU; optionally check them against the reference first.

Decode attention: ``nf4_paged_attention`` (one query token per sequence) against a
**bf16 paged baseline written in Triton in this file** (``_bf16_paged_decode_kernel``):
the same design as the NF4 kernel (GQA rows per program, ``TILE_N``-token tiles
through the block table) with the split-K the NF4 kernel had before it became
batch-invariant (a split count from the batch shape, a parallel reduce), reading
bf16 pages ``[num_blocks, num_kv_heads, block_size, head_dim]`` for K and V, with
no rotation and no calibration. So the ratio is what the page format, the in-kernel
rotation and the fixed chunks cost or save together. For scale, a further column
times torch SDPA on *contiguous* (unpaged) bf16 K/V, the best case for bf16.

Each row prints the bytes-moved floor (cache bytes read: for NF4
``batch * ctx * kv_heads * cell_bytes``; for bf16 ``batch * ctx * kv_heads * 2 * 2 *
head_dim``), achieved bandwidth (floor / time) and its share of the measured
device-to-device copy bandwidth. The store kernel (calibration, rotation and
quantize-on-write of model-space K/V) is timed against the bytes it must move (K/V
read + cells written).

``--check`` first runs every kernel against the reference on the device, checks that a
decode query's bits do not depend on its batch, and replays the store + attention from a
CUDA graph on new data against eager.

Timing: ``triton.testing.do_bench_cudagraph`` (graph replay: no Python launch
overhead; L2 is not flushed, so rows whose cache fits in L2, about 60 MB on
H200, read partly from L2 and can exceed HBM bandwidth).

    python scripts/bench_kernels.py --check             # correctness on GPU, then timing
    python scripts/bench_kernels.py --check-only
    python scripts/bench_kernels.py --contexts 8192 32768 --batches 8 32 --out bench.md
    TRITON_INTERPRET=1 python scripts/bench_kernels.py --device cpu --check-only --quick   # CPU dry run
"""

from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_kernels: no CUDA device (torch.cuda.is_available() is False). This script times "
                 "GPU kernels; run it on a CUDA machine (e.g. an H200). On CPU, the kernels are tested "
                 "under the Triton interpreter by tests/test_triton_kernels.py.")


# ---------------------------------------------------------------- bf16 baseline (Triton)


def _baseline_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _bf16_paged_decode_kernel(
        query_ptr,  # [num_seqs, num_q_heads, head_dim] bf16 (one query token per sequence)
        k_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim] bf16
        v_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim] bf16
        block_table_ptr,  # [num_seqs, max_blocks_per_seq] int32
        seq_lens_ptr,  # [num_seqs] int32
        out_ptr,  # NUM_SPLITS == 1: [num_seqs, num_q_heads, head_dim]; else fp32 [.., NUM_SPLITS, head_dim]
        max_ptr,  # [num_seqs, num_q_heads, NUM_SPLITS] fp32
        sum_ptr,  # [num_seqs, num_q_heads, NUM_SPLITS] fp32
        scale_log2,
        num_q_heads,
        stride_c_block: tl.int64,
        stride_c_head: tl.int64,
        stride_c_tok: tl.int64,
        stride_bt_seq: tl.int64,
        QUERIES_PER_KV: tl.constexpr,
        BLOCK_M: tl.constexpr,
        TILE_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
    ):
        seq = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        rows = tl.arange(0, BLOCK_M)
        row_ok = rows < QUERIES_PER_KV
        head = kv_head * QUERIES_PER_KV + rows
        d = tl.arange(0, HEAD_DIM)
        row_base = (seq * num_q_heads + head) * HEAD_DIM  # [BLOCK_M]
        q = tl.load(query_ptr + row_base[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
        seq_len = tl.load(seq_lens_ptr + seq)
        num_tiles = tl.cdiv(seq_len, TILE_N)
        per_split = tl.cdiv(num_tiles, NUM_SPLITS)
        tile_lo = tl.minimum(split * per_split, num_tiles)
        tile_hi = tl.minimum(tile_lo + per_split, num_tiles)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for tile in range(tile_lo, tile_hi):
            pos = tile * TILE_N + tl.arange(0, TILE_N)
            pos_ok = pos < seq_len
            block = tl.load(block_table_ptr + seq * stride_bt_seq + pos // BLOCK_SIZE, mask=pos_ok, other=0)
            off = block.to(tl.int64) * stride_c_block + kv_head * stride_c_head \
                + (pos % BLOCK_SIZE).to(tl.int64) * stride_c_tok
            k = tl.load(k_cache_ptr + off[:, None] + d[None, :], mask=pos_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2
            s = tl.where(row_ok[:, None] & pos_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
            p = tl.exp2(s - m_ref[:, None])
            alpha = tl.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
            v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=pos_ok[:, None], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        if NUM_SPLITS == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + row_base[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None])
        else:
            stat = (seq * num_q_heads + head) * NUM_SPLITS + split
            tl.store(max_ptr + stat, m_i, mask=row_ok)
            tl.store(sum_ptr + stat, l_i, mask=row_ok)
            tl.store(out_ptr + stat[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])

    @triton.jit
    def _bf16_reduce_kernel(
        out_ptr,  # [num_seqs, num_q_heads, head_dim]
        acc_ptr,  # [num_seqs, num_q_heads, NUM_SPLITS, head_dim] fp32
        max_ptr,  # [num_seqs, num_q_heads, NUM_SPLITS] fp32
        sum_ptr,  # [num_seqs, num_q_heads, NUM_SPLITS] fp32
        num_q_heads,
        stride_o_tok: tl.int64,
        stride_o_head: tl.int64,
        HEAD_DIM: tl.constexpr,
        HEAD_PAD: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        splits = tl.arange(0, SPLITS_PAD)
        split_ok = splits < NUM_SPLITS
        stat = (token * num_q_heads + head) * NUM_SPLITS
        m = tl.load(max_ptr + stat + splits, mask=split_ok, other=float("-inf"))
        l_s = tl.load(sum_ptr + stat + splits, mask=split_ok, other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.exp2(m - tl.where(m_max > float("-inf"), m_max, 0.0))
        total = tl.sum(l_s * w, axis=0)
        d = tl.arange(0, HEAD_PAD)
        acc = tl.load(acc_ptr + (stat + splits)[:, None] * HEAD_DIM + d[None, :],
                      mask=split_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + token * stride_o_tok + head * stride_o_head + d, out.to(out_ptr.dtype.element_ty),
                 mask=d < HEAD_DIM)

    return _bf16_paged_decode_kernel, _bf16_reduce_kernel


_BASELINE = None


def baseline_splits(batch: int, num_kv_heads: int, ctx: int) -> int:
    """The bf16 baseline's split count: enough programs for ~4 per SM, no split under 256 keys."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
    wanted = -(-4 * sms // (batch * num_kv_heads))
    return max(1, min(16, wanted, -(-ctx // 256)))


def bf16_paged_decode(
    query: torch.Tensor,  # [num_seqs, num_q_heads, head_dim] bf16
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim] bf16
    v_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim] bf16
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    softmax_scale: float,
    num_splits: int,
) -> torch.Tensor:
    """Decode attention on bf16 pages with the NF4 kernel's tiles and grid, split-K as NF4 did before
    its chunks (a count from the batch shape, merged by a parallel reduce): no rotation, no calibration."""
    global _BASELINE
    from vllm_nf4kv.kernels import triton_attention
    from vllm_nf4kv.kernels.triton_codec import next_power_of_2

    if _BASELINE is None:
        _BASELINE = _baseline_kernel()
    num_seqs, num_q_heads, head_dim = query.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    qpk = num_q_heads // num_kv_heads
    out = torch.empty_like(query)
    common = dict(QUERIES_PER_KV=qpk, BLOCK_M=max(16, next_power_of_2(qpk)),
                  TILE_N=triton_attention._TILE_N if head_dim <= 128 else triton_attention._TILE_N_SMALL,
                  BLOCK_SIZE=block_size, HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
                  num_warps=triton_attention._NUM_WARPS, num_stages=triton_attention._NUM_STAGES)
    grid = (num_seqs, num_kv_heads, num_splits)
    scale_log2 = softmax_scale * math.log2(math.e)
    strides = (*k_cache.stride()[:3], block_table.stride(0))
    decode_kernel, reduce_kernel = _BASELINE
    if num_splits == 1:
        decode_kernel[grid](query, k_cache, v_cache, block_table, seq_lens, out, out, out, scale_log2,
                        num_q_heads, *strides, **common)
        return out
    acc = torch.empty((num_seqs, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=query.device)
    stats = torch.empty((2, num_seqs, num_q_heads, num_splits), dtype=torch.float32, device=query.device)
    decode_kernel[grid](query, k_cache, v_cache, block_table, seq_lens, acc, stats[0], stats[1], scale_log2,
                        num_q_heads, *strides, **common)
    reduce_kernel[(num_seqs, num_q_heads)](
        out, acc, stats[0], stats[1], num_q_heads, *out.stride()[:2],
        HEAD_DIM=head_dim, HEAD_PAD=next_power_of_2(head_dim), NUM_SPLITS=num_splits,
        SPLITS_PAD=next_power_of_2(num_splits), num_warps=triton_attention._NUM_WARPS,
    )
    return out


# ---------------------------------------------------------------- correctness on the GPU


def _paged_nf4(gen: torch.Generator, layout, num_kv_heads: int, block_size: int, seq_lens: list[int],
               device: str):
    from vllm_nf4kv.kernels.triton_store import store_kv_nf4

    blocks_per_seq = max(-(-s // block_size) for s in seq_lens)
    num_blocks = blocks_per_seq * len(seq_lens) + 1
    cache = torch.zeros(num_blocks, num_kv_heads, block_size, layout.cell_bytes, dtype=torch.uint8,
                        device=device)
    table = torch.randperm(num_blocks, generator=gen)[: blocks_per_seq * len(seq_lens)]
    table = table.view(len(seq_lens), blocks_per_seq).to(torch.int32).to(device)
    for seq, seq_len in enumerate(seq_lens):
        pos = torch.arange(seq_len, device=device)
        slots = table[seq].long()[pos // block_size] * block_size + pos % block_size
        k = torch.randn(seq_len, num_kv_heads, layout.head_dim, generator=gen).to(device)
        v = torch.randn(seq_len, num_kv_heads, layout.head_dim, generator=gen).to(device)
        store_kv_nf4(cache, k, v, slots, layout)
    return cache, table


def _triton_load():
    """``tests/triton_load.py``, loaded by path: ``load_kv_nf4`` reads K/V back for checks only,
    so it lives with the tests, not in the package."""
    import importlib.util

    module = sys.modules.get("triton_load")
    if module is None:
        path = Path(__file__).resolve().parents[1] / "tests" / "triton_load.py"
        spec = importlib.util.spec_from_file_location("triton_load", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["triton_load"] = module
        spec.loader.exec_module(module)
    return module


def run_checks(device: str = "cuda", quick: bool = False) -> bool:
    """Every kernel against the reference on the GPU, at sizes the interpreter tests cannot reach.

    ``device="cpu"`` with ``quick`` (small sizes) is a dry run of this code under the Triton
    interpreter (bf16 dots there run as fp16: the interpreter's bf16 ``tl.dot`` is broken).
    """
    from vllm_nf4kv import reference
    from vllm_nf4kv.format import format_for
    from vllm_nf4kv.kernels.triton_attention import nf4_paged_attention
    from vllm_nf4kv.kernels.triton_store import store_kv_nf4
    from vllm_nf4kv.kv_transform import KVTransform
    from vllm_nf4kv.reference_attention import ATTENTION_TOLERANCE, paged_attention_reference
    from vllm_nf4kv.rotation import rotate, unrotate

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    ok = True

    def report(name: str, passed: bool, detail: str) -> None:
        nonlocal ok
        ok &= passed
        print(f"| {name} | {'ok' if passed else 'FAIL'} | {detail} |", flush=True)

    print("| check | result | detail |\n| --- | --- | --- |")
    # store: bit-exact against the CPU reference (model-space rows in, calibration applied inside)
    for head_dim in (64, 128, 256, 96)[: 2 if quick else 4]:
        for dtype in (torch.bfloat16, torch.float16, torch.float32)[: 1 if quick else 3]:
            layout = format_for("nf4", head_dim)
            tokens, heads, block_size = (24, 2, 16) if quick else (2048, 8, 16)
            x = torch.randn(2, tokens, heads, head_dim, generator=gen)
            x = (x * torch.exp2(torch.randint(-8, 9, (2, tokens, heads, 1), generator=gen).float())).to(dtype)
            transform = KVTransform(torch.rand(heads, head_dim, generator=gen) + 0.5,
                                    torch.randn(heads, head_dim, generator=gen),
                                    torch.randn(heads, head_dim, generator=gen), heads)
            num_blocks = tokens // block_size + 4
            slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
            slots[::97] = -1
            for calibrated in (False, True):
                cache = torch.zeros(num_blocks, heads, block_size, layout.cell_bytes, dtype=torch.uint8,
                                    device=device)
                tables = transform.store_tables(torch.device(device)) if calibrated else {}
                store_kv_nf4(cache, x[0].to(device), x[1].to(device), slots.to(device), layout, **tables)
                expected = torch.zeros(cache.shape, dtype=torch.uint8)
                rows = (transform.keys(x[0]), transform.values(x[1])) if calibrated else (x[0], x[1])
                reference.write_paged(expected, *rows, slots, layout)
                bad_cells = int((cache.cpu() != expected).any(-1).sum())
                valid = int((slots >= 0).sum())
                report(f"store d{head_dim} {str(dtype)[6:]}{' calibrated' if calibrated else ''}",
                       bad_cells == 0, f"{bad_cells} of {valid * heads} cells differ")
    # load (the tests' load_kv_nf4, tests/triton_load.py): exact in fp32, rounded to nearest even in bf16
    load_kv_nf4 = _triton_load().load_kv_nf4
    for head_dim, block_size in ((128, 16), (64, 128), (256, 32)):
        layout = format_for("nf4", head_dim)
        seq_lens = [1, 100, 33, block_size] if quick else [1, 1000, 4097, block_size]
        cache, table = _paged_nf4(gen, layout, 4, block_size, seq_lens, device)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        for out_dtype in (torch.float32, torch.bfloat16):
            key, value = load_kv_nf4(cache, table, lens, layout, out_dtype=out_dtype)
            equal = True
            for seq, seq_len in enumerate(seq_lens):
                rk, rv = reference.read_paged(cache, table[seq], seq_len, layout)
                equal &= torch.equal(key[seq, :seq_len], rk.to(out_dtype))
                equal &= torch.equal(value[seq, :seq_len], rv.to(out_dtype))
            report(f"load d{head_dim} bs{block_size} {str(out_dtype)[6:]}", equal, "vs reference.read_paged")
    # attention: decode, prefill, chunked prefill, splits, GQA, dtypes
    cases = [  # head_dim, kv_heads, gqa, block_size, seq_lens, q_lens, dtype, split
        (128, 8, 4, 16, [8192, 1, 333, 4096], [1, 1, 1, 1], torch.bfloat16, None),
        (128, 8, 4, 16, [8192, 1, 333, 4096], [1, 1, 1, 1], torch.bfloat16, True),
        (128, 2, 8, 128, [3000, 517], [1, 1], torch.float16, True),
        (64, 4, 1, 16, [1000, 70, 2049], [1, 1, 1], torch.float32, False),
        (256, 2, 4, 32, [600, 1], [1, 1], torch.bfloat16, None),
        (128, 8, 4, 16, [1500, 700, 64, 5], [1500, 300, 1, 5], torch.bfloat16, None),
        (64, 2, 8, 128, [2000, 129], [257, 129], torch.float16, None),
        (96, 2, 3, 16, [777, 40], [100, 40], torch.float32, True),
    ]
    for head_dim, kv_heads, gqa, block_size, seq_lens, q_lens, dtype, split in cases:
        if quick:  # same shapes of batch, 10x shorter
            seq_lens, q_lens = [max(1, n // 10) for n in seq_lens], [max(1, n // 10) for n in q_lens]
            kv_heads = 1
        layout = format_for("nf4", head_dim)
        cache, table = _paged_nf4(gen, layout, kv_heads, block_size, seq_lens, device)
        qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        query = torch.randn(sum(q_lens), kv_heads * gqa, head_dim, generator=gen).to(device).to(dtype)
        scale = head_dim**-0.5
        out = nf4_paged_attention(query, cache, table, qsl, lens, layout, scale, max_query_len=max(q_lens),
                                  split=split)
        expected = unrotate(paged_attention_reference(rotate(query), cache, table, qsl, lens, layout, scale))
        err = (out.float() - expected).abs().max().item()
        atol, rtol = ATTENTION_TOLERANCE[dtype]
        passed = bool(torch.isclose(out.float(), expected, atol=atol, rtol=rtol).all())
        name = f"attention d{head_dim} gqa{gqa} bs{block_size} {str(dtype)[6:]} q{max(q_lens)} split {split}"
        report(name, passed, f"max abs err {err:.2e} (atol {atol}, rtol {rtol})")
        if max(q_lens) == 1 and split is None:  # the same queries split and whole: the same bits
            other = nf4_paged_attention(query, cache, table, qsl, lens, layout, scale, split=False)
            again = nf4_paged_attention(query, cache, table, qsl, lens, layout, scale, split=True)
            report(f"{name}: split == whole", torch.equal(other, again), "bit for bit (batch invariance)")
    report_invariance_and_graphs(report, device, gen, quick)
    # the bf16 baseline used for timing must be right too
    half = torch.bfloat16 if device == "cuda" else torch.float16
    q = torch.randn(4, 32, 128, generator=gen).to(device, half)
    kc = torch.randn(40, 8, 16, 128, generator=gen).to(device, half)
    vc = torch.randn(40, 8, 16, 128, generator=gen).to(device, half)
    table = torch.randperm(40, generator=gen)[:36].view(4, 9).to(torch.int32).to(device)
    lens = torch.tensor([144, 1, 77, 100], dtype=torch.int32, device=device)
    for splits in (1, 4):
        out = bf16_paged_decode(q, kc, vc, table, lens, 0.1, splits)
        worst = 0.0
        for i, n in enumerate(lens.tolist()):
            k = kc[table[i].long()].transpose(1, 2).flatten(0, 1)[:n].float().repeat_interleave(4, 1)
            v = vc[table[i].long()].transpose(1, 2).flatten(0, 1)[:n].float().repeat_interleave(4, 1)
            p = (torch.einsum("hd,khd->hk", q[i].float(), k) * 0.1).softmax(-1)
            worst = max(worst, (torch.einsum("hk,khd->hd", p, v) - out[i].float()).abs().max().item())
        report(f"bf16 baseline splits{splits}", worst < 2e-2, f"max abs err {worst:.2e}")
    return ok


def report_invariance_and_graphs(report, device: str, gen: torch.Generator, quick: bool) -> None:
    """On the device: a decode query's bits alone vs in a mixed batch (tensor-core rows must not mix),
    and the store + attention captured in a CUDA graph, replayed on other data, equal to eager."""
    from vllm_nf4kv.format import format_for
    from vllm_nf4kv.kernels.triton_attention import nf4_paged_attention
    from vllm_nf4kv.kernels.triton_store import store_kv_nf4

    layout, kv_heads, gqa, block_size = format_for("nf4", 128), 2, 4, 16
    seq_lens = [900, 333, 70] if quick else [9000, 3333, 700]
    cache, table = _paged_nf4(gen, layout, kv_heads, block_size, seq_lens, device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    q_lens = [1, seq_lens[1] // 3, 1]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    query = torch.randn(sum(q_lens), kv_heads * gqa, 128, generator=gen).to(device).to(torch.bfloat16)
    scale = 128**-0.5
    mixed = nf4_paged_attention(query, cache, table, qsl, lens, layout, scale)
    one = torch.tensor([0, 1], dtype=torch.int32, device=device)
    same = True
    for seq, token in ((0, 0), (2, sum(q_lens) - 1)):
        for split in (False, True):
            alone = nf4_paged_attention(query[token:token + 1], cache, table[seq:seq + 1], one,
                                        lens[seq:seq + 1], layout, scale, split=split)
            same &= torch.equal(alone[0], mixed[token])
    report("decode alone == in a mixed batch", same, "bf16, split and whole, bit for bit")
    if device != "cuda":
        return
    # CUDA graph: capture with static buffers, change the data, replay, compare with eager
    static = {"query": query[:3].clone(), "lens": lens.clone(), "table": table.clone(),
              "kv": torch.randn(3, kv_heads, 128, device=device, dtype=torch.bfloat16),
              "slots": torch.tensor([5, 17, 40], device=device)}
    starts = torch.arange(4, dtype=torch.int32, device=device)

    def step() -> torch.Tensor:
        store_kv_nf4(cache, static["kv"], static["kv"], static["slots"], layout)
        return nf4_paged_attention(static["query"], cache, static["table"], starts, static["lens"], layout,
                                   scale, max_query_len=1, max_chunks=32)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    static["query"].copy_(torch.randn(3, kv_heads * gqa, 128, device=device).to(torch.bfloat16))
    new_lens = torch.tensor([8000, 12, 3000], dtype=torch.int32, device=device)
    static["lens"].copy_(new_lens // (10 if quick else 1))
    static["kv"].copy_(torch.randn(3, kv_heads, 128, device=device).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    replayed = out.clone()
    eager = step()
    report("CUDA graph replay == eager", torch.equal(replayed, eager), "store + attention, new data")


# ---------------------------------------------------------------- timing


def _bench(fn) -> float:
    """Milliseconds per call (graph replay when available)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    if hasattr(triton.testing, "do_bench_cudagraph"):
        return triton.testing.do_bench_cudagraph(fn, rep=100)
    return triton.testing.do_bench(fn, rep=100)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _bench(partial(dst.copy_, src))
    del src, dst
    return 2 * (1 << 30) / ms / 1e6


def bench_decode(args, peak_gbs: float) -> list[str]:
    from vllm_nf4kv.format import format_for
    from vllm_nf4kv.kernels.triton_attention import chunk_plan, nf4_paged_attention, should_split

    layout = format_for("nf4", args.head_dim)
    h_kv, h_q, d, bs = args.num_kv_heads, args.num_q_heads, args.head_dim, args.block_size
    lines = [
        f"Decode attention, head_dim {d}, {h_q} query / {h_kv} KV heads, block_size {bs}, "
        f"{args.dtype} queries; copy bandwidth {peak_gbs:.0f} GB/s.",
        "",
        "| ctx | batch | nf4 chunks (split) | nf4 us | nf4 GB/s (% copy) | bf16 splits | bf16 us "
        "| bf16 GB/s (% copy) | nf4 speedup | SDPA dense bf16 us |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for ctx in args.contexts:
        for batch in args.batches:
            blocks_per_seq = -(-ctx // bs)
            num_blocks = batch * blocks_per_seq
            table = torch.randperm(num_blocks, device="cuda", generator=gen).view(batch, blocks_per_seq)
            table = table.to(torch.int32)
            lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
            query = torch.randn(batch, h_q, d, device="cuda", generator=gen).to(dtype)
            nf4 = torch.randint(0, 256, (num_blocks, h_kv, bs, layout.cell_bytes), dtype=torch.uint8,
                                device="cuda", generator=gen)
            for off, row in ((0, layout.key), (layout.value_offset, layout.value)):
                nf4[..., off + row.code_bytes: off + row.row_bytes] = 16 << 3  # scale codes of 1.0
            splits = args.splits or baseline_splits(batch, h_kv, ctx)
            chunk, max_chunks = chunk_plan(max(args.contexts))  # one engine for every context of the table
            split = should_split(batch, h_kv, 1, batch * h_q * max_chunks * d * 4, query.device)
            scale = d**-0.5
            t_nf4 = _bench(partial(nf4_paged_attention, query, nf4, table, qsl, lens, layout, scale,
                                   max_query_len=1, chunk_tokens=chunk, max_chunks=max_chunks))
            del nf4
            kc = torch.randn(num_blocks, h_kv, bs, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            vc = torch.randn_like(kc)
            q_bf16 = query.to(torch.bfloat16)
            t_bf16 = _bench(partial(bf16_paged_decode, q_bf16, kc, vc, table, lens, scale, splits))
            del kc, vc
            t_sdpa = float("nan")
            try:
                kd = torch.randn(batch, h_kv, ctx, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                vd = torch.randn_like(kd)
                qd = q_bf16[:, :, None, :]
                t_sdpa = _bench(partial(torch.nn.functional.scaled_dot_product_attention, qd, kd, vd,
                                        scale=scale, enable_gqa=True))
                del kd, vd
            except Exception as exc:  # SDPA without GQA support on old torch: leave the column empty
                print(f"SDPA skipped: {exc}", file=sys.stderr)
            nf4_bytes = batch * ctx * h_kv * layout.cell_bytes
            bf16_bytes = batch * ctx * h_kv * 2 * 2 * d
            gbs_nf4, gbs_bf16 = nf4_bytes / t_nf4 / 1e6, bf16_bytes / t_bf16 / 1e6
            pct_nf4, pct_bf16 = 100 * gbs_nf4 / peak_gbs, 100 * gbs_bf16 / peak_gbs
            lines.append(
                f"| {ctx} | {batch} | {-(-ctx // chunk)} ({'yes' if split else 'no'}) | {t_nf4 * 1e3:.1f} "
                f"| {gbs_nf4:.0f} ({pct_nf4:.0f}%) | {splits} | {t_bf16 * 1e3:.1f} "
                f"| {gbs_bf16:.0f} ({pct_bf16:.0f}%) | {t_bf16 / t_nf4:.2f}x | {t_sdpa * 1e3:.1f} |"
            )
            print(lines[-1], flush=True)
    return lines


def _scatter_pair(cache: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """What a bf16 cache write costs at least: two row scatters (K and V into one buffer)."""
    cache.index_copy_(0, slots, key)
    cache.index_copy_(0, slots, value)


def bench_store(args, peak_gbs: float) -> list[str]:
    from vllm_nf4kv.format import format_for
    from vllm_nf4kv.kernels.triton_store import store_kv_nf4

    layout = format_for("nf4", args.head_dim)
    h_kv, d, bs = args.num_kv_heads, args.head_dim, args.block_size
    dtype = DTYPES[args.dtype]
    lines = [
        f"Store (one kernel: calibration, fp64 rotation, quantize-on-write; {args.dtype} model-space K/V "
        f"in, key search_steps {layout.key.search_steps}), head_dim {d}, {h_kv} KV heads; bytes = K/V "
        "read + cells written.",
        "",
        "| tokens | store us | GB/s (% copy) | calibrated store us | bf16 scatter us |",
        "| --- | --- | --- | --- | --- |",
    ]
    ones = torch.ones(h_kv, d, device="cuda")
    tables = {"key_offset": ones, "key_scale": ones, "value_offset": ones}
    for tokens in args.store_tokens:
        num_blocks = -(-tokens // bs) + 1
        cache = torch.zeros(num_blocks, h_kv, bs, layout.cell_bytes, dtype=torch.uint8, device="cuda")
        key = torch.randn(tokens, h_kv, d, device="cuda").to(dtype)
        value = torch.randn_like(key)
        slots = torch.randperm(num_blocks * bs, device="cuda")[:tokens]
        t_store = _bench(partial(store_kv_nf4, cache, key, value, slots, layout))
        t_calibrated = _bench(partial(store_kv_nf4, cache, key, value, slots, layout, **tables))
        bf16_cache = torch.zeros(num_blocks * bs, h_kv, d, device="cuda", dtype=torch.bfloat16)
        t_scatter = _bench(partial(_scatter_pair, bf16_cache, slots, key.to(torch.bfloat16),
                                   value.to(torch.bfloat16)))
        moved = 2 * tokens * h_kv * d * key.element_size() + tokens * h_kv * layout.cell_bytes
        gbs = moved / t_store / 1e6
        lines.append(f"| {tokens} | {t_store * 1e3:.1f} | {gbs:.0f} ({100 * gbs / peak_gbs:.0f}%) "
                     f"| {t_calibrated * 1e3:.1f} | {t_scatter * 1e3:.1f} |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="check every kernel against the reference first")
    parser.add_argument("--check-only", action="store_true", help="run the checks and stop")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--store-tokens", type=int, nargs="+", default=[32, 256, 8192])
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--num-q-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="query and K/V input dtype")
    parser.add_argument("--splits", type=int, default=None,
                        help="fix the bf16 baseline's split-K (default: baseline_splits)")
    parser.add_argument("--tile-n", type=int, default=None, help="override the attention kernels' TILE_N")
    parser.add_argument("--num-warps", type=int, default=None, help="override the attention kernels' warps")
    parser.add_argument("--num-stages", type=int, default=None,
                        help="override the attention kernels' pipeline stages (2 = ~80 KB shared at d128)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: dry run of --check-only --quick under TRITON_INTERPRET=1 (no timing)")
    parser.add_argument("--quick", action="store_true", help="small check sizes (for the CPU dry run)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown tables here")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1" or not args.check_only:
            sys.exit("bench_kernels: --device cpu is a dry run of the checks only: "
                     "TRITON_INTERPRET=1 python scripts/bench_kernels.py --device cpu --check-only --quick")
        passed = run_checks("cpu", quick=args.quick)
        print(f"checks: {'all passed' if passed else 'FAILED'}", flush=True)
        return 0 if passed else 1
    _need_cuda()
    import triton

    from vllm_nf4kv.kernels import triton_attention

    # launch-heuristic sweeps: the NF4 launcher and the bf16 baseline read these module constants
    for value, names in ((args.tile_n, ("_TILE_N", "_TILE_N_SMALL")), (args.num_warps, ("_NUM_WARPS",)),
                         (args.num_stages, ("_NUM_STAGES",))):
        for name in names if value else ():
            setattr(triton_attention, name, value)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"attention TILE_N {triton_attention._TILE_N}/{triton_attention._TILE_N_SMALL}, warps "
          f"{triton_attention._NUM_WARPS}, stages {triton_attention._NUM_STAGES}", flush=True)
    if args.check or args.check_only:
        passed = run_checks("cuda", quick=args.quick)
        print(f"checks: {'all passed' if passed else 'FAILED'}", flush=True)
        if not passed:
            return 1
        if args.check_only:
            return 0
    peak = copy_bandwidth()
    lines = ["## Decode attention", "", *bench_decode(args, peak), ""]
    lines += ["## Store", "", *bench_store(args, peak)]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
