"""Seeded randomized Hadamard rotation of head vectors.

Why: K/V head vectors have a few large channels; one absmax scale per group
then wastes most of the 16 NF4 levels. An orthogonal rotation spreads every
channel over all of them, so groups look Gaussian, which is exactly what NF4's
levels are built for. Because the rotation ``R`` is orthogonal, attention can
run in the rotated space: ``(q R)·(k R) = q·k`` and ``sum p (v R) R^T = sum p v``.

Rule for head sizes that are not powers of two: ``R`` is block diagonal, one
normalized Sylvester–Hadamard block per set bit of ``head_dim`` (largest
first, e.g. 96 = 64 + 32), with random signs on the columns. Every block is at
least 16 wide because the format requires ``head_dim % 16 == 0``.
"""

from __future__ import annotations

from functools import cache

import torch

from vllm_nf4kv.format import ROTATION_SEED, check_head_dim


def _sylvester_hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def power_of_two_blocks(head_dim: int) -> list[int]:
    """Block sizes of the block-diagonal Hadamard: the set bits of head_dim."""
    return [1 << b for b in reversed(range(head_dim.bit_length())) if head_dim >> b & 1]


@cache
def _rotation_cpu(head_dim: int, seed: int) -> torch.Tensor:
    check_head_dim(head_dim)
    rotation = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    start = 0
    for size in power_of_two_blocks(head_dim):
        rotation[start : start + size, start : start + size] = _sylvester_hadamard(size)
        start += size
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (head_dim,), generator=generator, dtype=torch.int64) * 2 - 1
    rotation = signs.to(torch.float64)[:, None] * rotation
    return rotation


_DEVICE_CACHE: dict[tuple[int, int, str, torch.dtype], torch.Tensor] = {}


def rotation_matrix(
    head_dim: int,
    device: torch.device | str = "cpu",
    seed: int = ROTATION_SEED,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``R`` as ``[head_dim, head_dim]``; rotate rows with ``x @ R``."""
    key = (head_dim, seed, str(device), dtype)
    cached = _DEVICE_CACHE.get(key)
    if cached is None:
        cached = _rotation_cpu(head_dim, seed).to(device=device, dtype=dtype)
        _DEVICE_CACHE[key] = cached
    return cached


def rotate(x: torch.Tensor, dtype: torch.dtype = torch.float32, seed: int = ROTATION_SEED) -> torch.Tensor:
    """``x @ R``, accumulated in fp64 and returned as ``dtype``.

    Why fp64: a row's result must not depend on how many rows are rotated with
    it (BLAS picks kernels, and so summation orders, by matrix shape). With
    power-of-two blocks every product is exact and fp64 sums of bf16/fp16
    inputs are exact too, so a token quantizes to the same bytes whether it
    arrives in a 1-token decode, a prefill chunk or a whole prompt.
    """
    rotation = rotation_matrix(x.shape[-1], x.device, seed, torch.float64)
    return (x.to(torch.float64) @ rotation).to(dtype)


def unrotate(x: torch.Tensor, dtype: torch.dtype = torch.float32, seed: int = ROTATION_SEED) -> torch.Tensor:
    """Inverse of :func:`rotate`: ``x @ R^T``, accumulated in fp64."""
    rotation = rotation_matrix(x.shape[-1], x.device, seed, torch.float64)
    return (x.to(torch.float64) @ rotation.T).to(dtype)
