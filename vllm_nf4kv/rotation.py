"""Seeded randomized Hadamard rotation of head vectors.

Why: K/V head vectors have a few large channels; one absmax scale per group
then wastes most of the 16 NF4 levels. An orthogonal rotation spreads every
channel over all of them, so groups look Gaussian, which is exactly what NF4's
levels are built for. Because the rotation ``R`` is orthogonal, attention can
run in the rotated space: ``(q R)·(k R) = q·k`` and ``sum p (v R) R^T = sum p v``.

Rule for head sizes that are not powers of two: ``R`` is block diagonal, one
normalized Sylvester–Hadamard block per set bit of ``head_dim`` (largest
first, e.g. 96 = 64 + 32), with random signs on its rows (the input channels). Every block is at
least 16 wide because the format requires ``head_dim % 16 == 0``.
"""

from __future__ import annotations

import math
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
def _signs_cpu(head_dim: int, seed: int) -> torch.Tensor:
    check_head_dim(head_dim)
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (head_dim,), generator=generator, dtype=torch.int64) * 2 - 1
    return signs.to(torch.float64)


def rotation_matrix(head_dim: int, seed: int = ROTATION_SEED) -> torch.Tensor:
    """``R = diag(signs) · blockdiag(H)`` as fp64 ``[head_dim, head_dim]``: the definition the
    butterflies of :func:`rotate` compute (``rotate(x) = x @ R``), for tests and readers."""
    rotation = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    start = 0
    for size in power_of_two_blocks(head_dim):
        rotation[start : start + size, start : start + size] = _sylvester_hadamard(size)
        start += size
    return _signs_cpu(head_dim, seed)[:, None] * rotation


_SIGNS_ON_DEVICE: dict[tuple[int, int, str], torch.Tensor] = {}


def rotation_signs(
    head_dim: int, device: torch.device | str = "cpu", seed: int = ROTATION_SEED
) -> torch.Tensor:
    """The fp64 ``±1`` of ``diag(signs)`` (the C++ and Triton kernels take them as a table)."""
    key = (head_dim, seed, str(device))
    signs = _SIGNS_ON_DEVICE.get(key)
    if signs is None:
        signs = _SIGNS_ON_DEVICE[key] = _signs_cpu(head_dim, seed).to(device)
    return signs


def block_norm(size: int) -> float:
    """``1 / sqrt(size)`` as the C++ kernels compute it (IEEE sqrt and division, both exact-rounded)."""
    return 1.0 / math.sqrt(size)


def _hadamard_blocks(y: torch.Tensor) -> torch.Tensor:
    """``y @ blockdiag(H)`` in fp64: butterflies (stride 1, 2, 4, ...) per block, then ``1/sqrt(size)``.

    Why butterflies and not a matmul: the operations and their order are fixed
    (a matmul's summation order is BLAS's choice), so ``csrc/rotation.h``
    performs exactly these and gets the same bits; and each output is a sum of
    ``±x`` exact in fp64 for bf16/fp16 inputs, so a token rotates to the same
    bytes whatever batch it arrives in.
    """
    pieces = []
    for piece in torch.split(y, power_of_two_blocks(y.shape[-1]), dim=-1):
        size, stride = piece.shape[-1], 1
        while stride < size:
            pairs = piece.reshape(*piece.shape[:-1], size // (2 * stride), 2, stride)
            first, second = pairs[..., 0, :], pairs[..., 1, :]
            piece = torch.stack([first + second, first - second], dim=-2).reshape(*piece.shape)
            stride *= 2
        pieces.append(piece * block_norm(size))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)


def rotate(x: torch.Tensor, dtype: torch.dtype = torch.float32, seed: int = ROTATION_SEED) -> torch.Tensor:
    """``x @ R``: signs, then the Hadamard butterflies (:func:`_hadamard_blocks`), in fp64, as ``dtype``.

    The same operations on every device and in every kernel (``csrc/rotation.h``,
    :mod:`vllm_nf4kv.kernels.triton_rotation`), so a row rotates to the same bits everywhere.
    """
    signs = rotation_signs(x.shape[-1], x.device, seed)
    return _hadamard_blocks(x.to(torch.float64) * signs).to(dtype)


def unrotate(x: torch.Tensor, dtype: torch.dtype = torch.float32, seed: int = ROTATION_SEED) -> torch.Tensor:
    """Inverse of :func:`rotate`: ``x @ R^T``, the Hadamard blocks then the signs, in fp64."""
    signs = rotation_signs(x.shape[-1], x.device, seed)
    return (_hadamard_blocks(x.to(torch.float64)) * signs).to(dtype)
