"""The CUDA backend's impl (Triton kernels) against the CPU backend's path, without a GPU.

Runs ``NF4TritonAttentionImpl.do_kv_cache_update`` and ``forward`` under
``TRITON_INTERPRET=1`` in a fresh interpreter (Triton reads the variable when
kernels are defined, so it must not leak into this process) and checks that it
writes the same cache bytes as the reference codec and attends like
:func:`vllm_nf4kv.paged_attention.paged_attention`, the CPU backend's math, on a
mixed batch (decode, chunked prefill, whole prefill) with GQA and blocks of 16; then, with a
layer's calibration, serves keys and values riding on large biases through the offsets as the
CPU backend does (tests/test_calibration.py); and records every torch op the warmed-up impl issues
around the kernels: views only (no host sync, no arithmetic, the CUDA-graph contract).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from vllm_nf4kv.format import format_for

pytestmark = pytest.mark.triton

SCRIPT = textwrap.dedent(
    """
    import types, torch
    from vllm_nf4kv import reference
    from vllm_nf4kv.backends.triton_attn import NF4TritonAttentionBackend, NF4TritonAttentionImpl
    from vllm_nf4kv.format import format_for
    from vllm_nf4kv.paged_attention import paged_attention
    from vllm_nf4kv.rotation import rotate, unrotate

    torch.manual_seed(0)
    heads, kv_heads, dim, block, num_blocks = 8, 2, 64, 16, 24
    layout = format_for("nf4", dim)
    impl = NF4TritonAttentionImpl(heads, dim, dim ** -0.5, kv_heads, None, None, "nf4")
    seq_lens = torch.tensor([37, 20, 9], dtype=torch.int32)
    query_lens = [1, 7, 9]  # decode, chunked prefill (13 cached), whole prefill
    block_table = torch.randperm(num_blocks, dtype=torch.int32)[:9].view(3, 3).contiguous()
    cache = torch.zeros(num_blocks, kv_heads, block, layout.cell_bytes, dtype=torch.uint8)
    expected = torch.zeros_like(cache)
    for r, n in enumerate(seq_lens.tolist()):
        key, value = torch.randn(n, kv_heads, dim), torch.randn(n, kv_heads, dim)
        slots = torch.tensor([int(block_table[r, t // block]) * block + t % block for t in range(n)])
        impl.do_kv_cache_update(None, key, value, cache, slots)
        reference.write_paged(expected, key, value, slots, layout)
    assert torch.equal(cache, expected), "store kernel differs from the reference codec"

    query_start_loc = torch.tensor([0, 1, 8, 17], dtype=torch.int32)
    query = torch.randn(17, heads, dim)
    metadata = types.SimpleNamespace(
        num_actual_tokens=17, query_start_loc=query_start_loc, seq_lens=seq_lens,
        block_table=block_table, max_query_len=9, max_seq_len=37,
    )
    output = torch.zeros(17, heads * dim)
    impl.forward(None, query, None, None, cache, metadata, output)
    rotated = paged_attention(
        rotate(query), cache, layout, query_start_loc, seq_lens, block_table, dim ** -0.5
    )
    want = unrotate(rotated).view(17, heads * dim)
    error = (output - want).abs().max().item()
    assert error < 1e-4, error

    # with a calibration: keys and values on large biases, served through the offsets and d = 4
    from vllm_nf4kv import calibration as cal
    from vllm_nf4kv.backends.smoothing import LayerSmoothing
    from vllm_nf4kv.tools.calibrate import causal_attention

    n = 40
    layer = types.SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    key_bias, value_bias = torch.randn(kv_heads, dim) * 40, torch.randn(kv_heads, dim) * 20
    entry = cal.LayerCalibration(kv_heads, dim, torch.full((kv_heads, dim), 4.0), key_bias, value_bias)
    calibration = cal.Calibration("f", "m", "t", 0, 0, (0.0,), {2048: {layer.layer_name: entry}})
    q = torch.randn(n, heads, dim)
    k, v = torch.randn(n, kv_heads, dim) + key_bias, torch.randn(n, kv_heads, dim) + value_bias
    exact = causal_attention(q.double(), k.double(), v.double(), dim ** -0.5, None)
    metadata = types.SimpleNamespace(
        num_actual_tokens=n, query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32), block_table=torch.arange(3, dtype=torch.int32)[None],
        max_query_len=n, max_seq_len=n,
    )
    errors = {}
    for name, smoothing in (("calibrated", LayerSmoothing(calibration, heads, kv_heads, kv_heads, dim)),
                            ("uncalibrated", LayerSmoothing(None, heads, kv_heads, kv_heads, dim))):
        impl.smoothing = smoothing
        cache = torch.zeros(3, kv_heads, block, layout.cell_bytes, dtype=torch.uint8)
        impl.do_kv_cache_update(layer, k, v, cache, torch.arange(n))
        output = torch.zeros(n, heads * dim)
        impl.forward(layer, q, k, v, cache, metadata, output)
        got = output.view(n, heads, dim).double()
        errors[name] = float((got - exact).square().sum() / exact.square().sum())
    # the CPU backend's test measured 5.5e-6 and 3.6e-3 on the same construction
    assert errors["calibrated"] < 1e-4 and errors["uncalibrated"] > 10 * errors["calibrated"], errors

    # the hot path issues no torch op but views between vLLM and the kernels: no host sync, no
    # arithmetic, no allocation but the interpreter's own (a warmed-up impl, decode and prefill)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    interpreter = {"aten.empty.memory_format", "aten.new_empty.default", "aten.set_.source_Storage",
                   "aten.set_.source_Storage_storage_offset", "aten.copy_.default", "aten.lift_fresh.default"}
    views = {"aten.slice.Tensor", "aten.select.int", "aten.view.default", "aten.view.dtype",
             "aten.detach.default", "aten.alias.default"}
    impl.smoothing = LayerSmoothing(calibration, heads, kv_heads, kv_heads, dim)
    impl.smoothing.for_layer(layer)  # what resolve_model_layers does when the weights load
    impl.do_kv_cache_update(layer, k, v, cache, torch.arange(n))  # warm-up: the tables move once
    slots = torch.arange(n)
    for max_query_len in (1, n):
        metadata.max_query_len = max_query_len
        with Ops() as recorded:
            impl.do_kv_cache_update(layer, k, v, cache, slots)
            impl.forward(layer, q, k, v, cache, metadata, output)
        assert not recorded.ops - interpreter - views, sorted(recorded.ops - interpreter - views)
    print("OK", error, errors)
    """
)


def test_cuda_impl_matches_cpu_path_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK" in result.stdout


def test_cuda_backend_declares_nf4_pages_and_refuses_what_it_cannot_serve():
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_nf4kv.backends.triton_attn import NF4TritonAttentionBackend, NF4TritonAttentionImpl

    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=128, dtype=torch.uint8)
    nf4 = NF4TritonAttentionBackend.customize_spec(spec)
    # one cell (K and V rows) per token and KV head, where the uint8 spec asks for 2 * 128 bytes
    assert nf4.page_size_bytes == 16 * 2 * format_for("nf4", 128).cell_bytes < spec.page_size_bytes
    assert NF4TritonAttentionBackend.supports_kv_cache_dtype("nf4")
    assert not NF4TritonAttentionBackend.supports_kv_cache_dtype("auto")
    assert not NF4TritonAttentionBackend.supports_head_size(72)
    with pytest.raises(ValueError, match="sliding windows"):
        NF4TritonAttentionImpl(8, 64, 0.125, 2, None, 128, "nf4")
    with pytest.raises(ValueError, match="multiple of 16"):
        NF4TritonAttentionImpl(8, 72, 0.125, 2, None, None, "nf4")
