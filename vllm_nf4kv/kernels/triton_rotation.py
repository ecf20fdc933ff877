"""The Hadamard rotation inside the Triton kernels: ``reference.rotate`` operation for operation.

The store kernel rotates each K/V row before it quantizes it, and the attention kernel
rotates its queries in the prologue and un-rotates its output in the epilogue, so nothing
runs between vLLM and the kernels but views. The arithmetic is the reference's
(:func:`vllm_nf4kv.rotation.rotate`): fp64, the signs first, butterflies of stride 1, 2,
4, ... within each power-of-two block (``a + b``, ``a - b``), then the block's
``1 / sqrt(size)``, rounded once to fp32. Every output is a fixed expression of its own row,
so a row rotates to the same bits in a call of one token or of thousands, on every device.

A row is a ``[ROWS, D_PAD]`` tile, ``D_PAD`` the head size rounded up to a power of two
(at least 32, the attention kernel's even/odd tiles need 16 columns each). The butterflies
run over all of ``D_PAD`` and each column keeps a stage's result only while its block is
wider than the stride, so the blocks of a head size that is not a power of two (96 = 64 +
32) never mix and the padding columns stay 0. The per-column signs, norms and block sizes
come from one fp64 table on the device (:func:`rotation_table`), built once from
:mod:`vllm_nf4kv.rotation`, so no constant is retyped here (a Python float in a Triton
expression would be an fp32 constant: ``1 / sqrt(32)`` would lose its fp64 bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_nf4kv.rotation import block_norm, power_of_two_blocks, rotation_signs

# Rows of rotation_table: where each kind of per-column value starts (times D_PAD).
_SIGNS_ROW: tl.constexpr = tl.constexpr(0)
_NORMS_ROW: tl.constexpr = tl.constexpr(1)
_SIZES_ROW: tl.constexpr = tl.constexpr(2)
MIN_PADDED_HEAD_DIM = 32

_TABLES: dict[tuple[int, str], torch.Tensor] = {}


def padded_head_dim(head_dim: int) -> int:
    """``D_PAD``: the power of two (>= 32) the kernels hold a head vector in."""
    return max(MIN_PADDED_HEAD_DIM, 1 << max(0, head_dim - 1).bit_length())


def butterfly_stages(head_dim: int) -> int:
    """How many butterfly strides the largest block needs (log2 of its size)."""
    return power_of_two_blocks(head_dim)[0].bit_length() - 1


def is_one_block(head_dim: int) -> bool:
    """A power-of-two head size: one Hadamard block, no per-column gating needed."""
    return head_dim & (head_dim - 1) == 0 and head_dim == padded_head_dim(head_dim)


def rotation_table(head_dim: int, device: torch.device | str) -> torch.Tensor:
    """fp64 ``[3, D_PAD]`` on ``device``: each column's sign, block norm and block size (0 past head_dim).

    Built once per head size and device (at the backend's construction, before any CUDA
    graph is captured) and read by every kernel that rotates.
    """
    key = (head_dim, str(device))
    table = _TABLES.get(key)
    if table is None:
        padded = padded_head_dim(head_dim)
        table = torch.zeros(3, padded, dtype=torch.float64)
        table[0, :head_dim] = rotation_signs(head_dim)
        start = 0
        for size in power_of_two_blocks(head_dim):
            table[1, start : start + size] = block_norm(size)
            table[2, start : start + size] = float(size)
            start += size
        table = _TABLES[key] = table.to(device)
    return table


def rotation_constexprs(head_dim: int) -> dict[str, int | bool]:
    """The constexprs every rotating kernel takes, from the head size alone."""
    return {
        "D_PAD": padded_head_dim(head_dim),
        "STAGES": butterfly_stages(head_dim),
        "ONE_BLOCK": is_one_block(head_dim),
    }


@triton.jit
def _butterflies(
    x, sizes, ROWS: tl.constexpr, D_PAD: tl.constexpr, STAGES: tl.constexpr, ONE_BLOCK: tl.constexpr
):
    """``x [ROWS, D_PAD]`` fp64 times the unnormalized block-diagonal Hadamard, stride 1 first."""
    for level in tl.static_range(STAGES):
        # columns (i, i + stride) of each 2 * stride run: [.., runs, 2, stride] -> pairs last
        quads = tl.reshape(x, [ROWS, D_PAD // (2 << level), 2, 1 << level])
        first, second = tl.split(tl.permute(quads, (0, 1, 3, 2)))
        mixed = tl.join(first + second, first - second)
        mixed = tl.reshape(tl.permute(mixed, (0, 1, 3, 2)), [ROWS, D_PAD])
        if ONE_BLOCK:
            x = mixed
        else:
            x = tl.where(sizes[None, :] > (1 << level), mixed, x)
    return x


@triton.jit
def rotate_rows(
    x, table_ptr, ROWS: tl.constexpr, D_PAD: tl.constexpr, STAGES: tl.constexpr, ONE_BLOCK: tl.constexpr
):
    """fp32 ``x [ROWS, D_PAD]`` (0 past the head size) -> fp32 ``x @ R`` (``rotation.rotate``)."""
    cols = tl.arange(0, D_PAD)
    signs = tl.load(table_ptr + _SIGNS_ROW * D_PAD + cols)
    sizes = tl.load(table_ptr + _SIZES_ROW * D_PAD + cols)
    y = _butterflies(x.to(tl.float64) * signs[None, :], sizes, ROWS, D_PAD, STAGES, ONE_BLOCK)
    return (y * tl.load(table_ptr + _NORMS_ROW * D_PAD + cols)[None, :]).to(tl.float32)


@triton.jit
def unrotate_rows(
    x, table_ptr, ROWS: tl.constexpr, D_PAD: tl.constexpr, STAGES: tl.constexpr, ONE_BLOCK: tl.constexpr
):
    """fp32 ``x [ROWS, D_PAD]`` -> fp32 ``x @ R^T`` (``rotation.unrotate``: blocks, norms, then signs)."""
    cols = tl.arange(0, D_PAD)
    sizes = tl.load(table_ptr + _SIZES_ROW * D_PAD + cols)
    y = _butterflies(x.to(tl.float64), sizes, ROWS, D_PAD, STAGES, ONE_BLOCK)
    y = y * tl.load(table_ptr + _NORMS_ROW * D_PAD + cols)[None, :]
    return (y * tl.load(table_ptr + _SIGNS_ROW * D_PAD + cols)[None, :]).to(tl.float32)
