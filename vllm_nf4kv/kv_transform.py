"""What the nf4 backends apply around the kernels: one layer's calibration, per step.

Split from :mod:`vllm_nf4kv.calibration` (the file and its lookup, done once at startup)
because this runs on every forward: keys become ``(k - c) * d`` and values ``v - mu`` before
the store, queries ``q / d`` before attention, ``mu`` is added to the output. Exact by
construction (``docs/format.md``, "Calibration"), so a prefix-cache hit still equals a cold
run bit for bit.
"""

from __future__ import annotations

import torch


def local_heads(num_kv_heads_local: int, total_kv_heads: int, tp_rank: int, tp_size: int) -> slice:
    """Which of the calibration's KV heads this tensor-parallel rank holds (vLLM's sharding).

    vLLM splits KV heads evenly over ranks, or, with fewer KV heads than ranks, gives each
    rank one head shared by ``tp_size / total_kv_heads`` consecutive ranks.
    """
    if total_kv_heads >= tp_size:
        start = tp_rank * num_kv_heads_local
    else:
        start = tp_rank * total_kv_heads // tp_size
    return slice(start, start + num_kv_heads_local)


class KVTransform:
    """Applies one layer's calibration, exact by construction (module docstring).

    Keys become ``(k - c) * d`` and values ``v - mu`` before the store; queries ``q / d``
    before attention; ``mu`` is added to the output. The tensors move to the device once,
    on first use, and every step after that uses the same ones.
    """

    def __init__(
        self, key_scale: torch.Tensor, key_offset: torch.Tensor, value_offset: torch.Tensor, num_heads: int
    ) -> None:
        group = num_heads // key_scale.shape[0]
        self.key_scale = key_scale.contiguous()  # [Hkv, D]
        self.key_offset = key_offset.contiguous() if bool(key_offset.any()) else None
        self.value_offset = value_offset.contiguous() if bool(value_offset.any()) else None
        self.query_scale = (1.0 / key_scale).repeat_interleave(group, 0).contiguous()  # [Hq, D]
        self.output_offset = (
            None if self.value_offset is None else self.value_offset.repeat_interleave(group, 0).contiguous()
        )
        self._device = torch.device("cpu")

    @property
    def is_identity(self) -> bool:
        return bool((self.key_scale == 1).all()) and self.key_offset is None and self.value_offset is None

    def move_to(self, device: torch.device) -> None:
        """Put the tables on ``device`` (once: later calls on the same device do nothing)."""
        if device != self._device:
            for name in ("key_scale", "key_offset", "value_offset", "query_scale", "output_offset"):
                value = getattr(self, name)
                if value is not None:
                    setattr(self, name, value.to(device))
            self._device = device

    def store_tables(self, device: torch.device) -> dict[str, torch.Tensor | None]:
        """What the Triton store kernel applies itself (``store_kv_nf4``'s keyword arguments)."""
        self.move_to(device)
        return {"key_offset": self.key_offset, "key_scale": self.key_scale, "value_offset": self.value_offset}

    def attention_tables(self, device: torch.device) -> dict[str, torch.Tensor | None]:
        """What the Triton attention kernel applies itself (``nf4_paged_attention``'s keyword arguments)."""
        self.move_to(device)
        return {"query_scale": self.query_scale, "output_offset": self.output_offset}

    def keys(self, key: torch.Tensor) -> torch.Tensor:
        """``[T, Hkv, D]`` -> fp32 ``(k - c) * d``."""
        self.move_to(key.device)
        key = key.float() if self.key_offset is None else key.float() - self.key_offset
        return key * self.key_scale

    def values(self, value: torch.Tensor) -> torch.Tensor:
        """``[T, Hkv, D]`` -> ``v - mu`` in fp32 (unchanged without a value offset)."""
        self.move_to(value.device)
        return value if self.value_offset is None else value.float() - self.value_offset

    def queries(self, query: torch.Tensor) -> torch.Tensor:
        """``[T, Hq, D]`` -> fp32 ``q / d`` (as a product with ``1 / d``, the same bits every call)."""
        self.move_to(query.device)
        return query.float() * self.query_scale

    def outputs(self, output: torch.Tensor) -> torch.Tensor:
        """``[T, Hq, D]`` attention over ``v - mu`` -> over ``v`` (the weights sum to 1)."""
        self.move_to(output.device)
        return output if self.output_offset is None else output + self.output_offset
