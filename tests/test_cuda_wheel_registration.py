"""The CUDA wheels' path (``register_kv_cache_dtype``, vLLM 0.33 and 0.34), at config level.

The CUDA wheel cannot run an engine on a CPU machine, but everything up to the
engine can run with ``VLLM_TARGET_DEVICE=cpu``: the dtype hook, ``--kv-cache-dtype
nf4`` validation, ``create_engine_config``, backend selection, and the CUDA
backend's spec. Run with ``make test-vllm033`` / ``make test-vllm034`` (they build
``.venv-vllm033`` / ``.venv-vllm034``); on vLLM 0.32 (no hook) the module is skipped.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

from vllm.config import cache as cache_module  # noqa: E402

if not hasattr(cache_module, "register_kv_cache_dtype"):
    pytest.skip("vLLM without register_kv_cache_dtype (0.32): see make test-vllm034", allow_module_level=True)

import torch  # noqa: E402

from vllm_nf4kv import plugin  # noqa: E402
from vllm_nf4kv.backends.selection import CPU_BACKEND, CUDA_BACKEND, select_nf4_backend  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def registered():
    plugin.register()
    plugin.register()  # idempotent


def test_hook_is_used_not_the_032_patch():
    from typing import get_args

    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    assert "nf4" in cache_module.KV_CACHE_DTYPES
    assert cache_module.KV_CACHE_DTYPES.count("nf4") == 1
    assert cache_module.get_kv_cache_dtype_handler("nf4") is not None
    assert STR_DTYPE_TO_TORCH_DTYPE["nf4"] == torch.uint8
    assert "nf4" not in get_args(cache_module.CacheDType)  # the Literal was left alone


def test_engine_config_accepts_nf4(model_dir):
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=str(model_dir), kv_cache_dtype="nf4", enforce_eager=True).create_engine_config()
    assert config.cache_config.cache_dtype == "nf4"
    with pytest.raises(Exception, match="nf5|kv_cache_dtype|cache_dtype"):
        EngineArgs(model=str(model_dir), kv_cache_dtype="nf5", enforce_eager=True).create_engine_config()


def test_platform_routes_only_nf4(model_dir):
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.selector import get_attn_backend

    for dtype, expected in (("nf4", "NF4CPUAttentionBackend"), ("auto", "CPUAttentionBackend")):
        args = EngineArgs(model=str(model_dir), kv_cache_dtype=dtype, enforce_eager=True)
        config = args.create_engine_config()
        with set_current_vllm_config(config):
            backend = get_attn_backend(64, torch.bfloat16, dtype)
        assert backend.__name__ == expected


def _selector(**overrides):
    from vllm.v1.attention.backend import AttentionType

    fields = dict(
        head_size=128, use_mla=False, use_sparse=False, attn_type=AttentionType.DECODER, has_sink=False,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_cuda_selection_and_refusals():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    cuda = SimpleNamespace(is_cpu=lambda: False, is_cuda=lambda: True, device_name="cuda")
    assert select_nf4_backend(cuda, None, _selector()) == CUDA_BACKEND
    assert select_nf4_backend(cuda, AttentionBackendEnum.TRITON_ATTN, _selector()) == CUDA_BACKEND
    cpu = SimpleNamespace(is_cpu=lambda: True, is_cuda=lambda: False, device_name="cpu")
    assert select_nf4_backend(cpu, None, _selector()) == CPU_BACKEND
    with pytest.raises(ValueError, match="cannot read nf4 pages"):
        select_nf4_backend(cuda, AttentionBackendEnum.FLASH_ATTN, _selector())
    with pytest.raises(ValueError, match="MLA"):
        select_nf4_backend(cuda, None, _selector(use_mla=True))
    with pytest.raises(ValueError, match="multiple of 16"):
        select_nf4_backend(cuda, None, _selector(head_size=72))


def test_cuda_backend_spec_on_033():
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheLayout

    from vllm_nf4kv.backends.triton_attn import NF4TritonAttentionBackend

    spec = FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.uint8)
    assert NF4TritonAttentionBackend.customize_spec(spec).page_size_bytes == 16 * 8 * 136
    assert NF4TritonAttentionBackend.supported_kv_cache_layouts() == (KVCacheLayout.LBHNC,)
    assert NF4TritonAttentionBackend.supports_kv_cache_dtype("nf4")


@pytest.mark.parametrize("head_size", [64, 128, 256])
def test_cuda_backend_takes_the_default_block_size(head_size):
    """vLLM 0.34 defaults to 64-token blocks on CUDA (0.33: 16): the nf4 backend's kernel block
    sizes take the default as it is (no split into kernel blocks), pages sized by the nf4 cell.
    The kernels address keys per token through the block table, so any multiple of 16 works."""
    import vllm
    from vllm.config import CacheConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.worker.utils import select_common_block_size

    from vllm_nf4kv.backends.triton_attn import NF4TritonAttentionBackend
    from vllm_nf4kv.format import format_for

    default = CacheConfig.DEFAULT_BLOCK_SIZE
    assert default == (64 if vllm.__version__.startswith("0.34") else 16)
    spec = NF4TritonAttentionBackend.customize_spec(
        FullAttentionSpec(block_size=default, num_kv_heads=2, head_size=head_size, dtype=torch.uint8)
    )
    assert select_common_block_size(default, [NF4TritonAttentionBackend], [spec]) == default
    assert spec.page_size_bytes == default * 2 * format_for("nf4", head_size).cell_bytes
    assert NF4TritonAttentionBackend.get_preferred_block_size(default) == default


def test_nf4_pages_under_the_extensible_kv_cache(model_dir, monkeypatch):
    """vLLM 0.34 turns on its extensible KV cache on CUDA: an nf4 engine config gets it (and
    ``gpu_memory_utilization`` 1.0), and the views it builds over the reserved address space are
    the uint8 ``[blocks, kv_heads, block_size, cell]`` pages with contiguous cells the kernels
    address by block table and slot; the views re-bound after the final commit (fewer blocks,
    same addresses) keep every stride, so nothing the impl does depends on the first view."""
    import vllm

    if not vllm.__version__.startswith("0.34"):
        pytest.skip(f"the extensible KV cache is vLLM 0.34's (this is {vllm.__version__})")
    from cuda_wheel_on_cpu import allow_config_level
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheLayout,
        KVCacheTensor,
        create_kv_cache_views,
    )
    from vllm.v1.worker.extensible_kv_cache import pad_kv_cache_segments

    from vllm_nf4kv.backends.triton_attn import NF4TritonAttentionBackend
    from vllm_nf4kv.format import format_for
    from vllm_nf4kv.reference import check_paged_cache

    allow_config_level()
    config = EngineArgs(model=str(model_dir), kv_cache_dtype="nf4", enforce_eager=True).create_engine_config()
    monkeypatch.setattr(type(current_platform), "is_cuda_alike", lambda self: True)
    config.cache_config._extensible_kv_cache_resolved = False
    config.cache_config.enable_extensible_kv_cache = None
    config._resolve_extensible_kv_cache()
    assert config.cache_config.enable_extensible_kv_cache is True

    layout = format_for("nf4", 128)
    spec = NF4TritonAttentionBackend.customize_spec(
        FullAttentionSpec(block_size=64, num_kv_heads=2, head_size=128, dtype=torch.uint8)
    )
    layers, capacity, page = ["a", "b", "c"], 1000, spec.page_size_bytes

    tensor = KVCacheTensor(size=len(layers) * capacity * page, layers=layers,
                           layer_stride=capacity * page, block_stride=page)
    kv_config = KVCacheConfig(num_blocks=capacity, kv_cache_tensors=[tensor],
                              kv_cache_groups=[KVCacheGroupSpec(layers, spec)])
    padded = pad_kv_cache_segments(kv_config, KVCacheLayout.LBHNC, 2 << 20).kv_cache_tensors[0]
    assert padded.layer_stride % (2 << 20) == 0  # each layer's region starts on a granule
    raw = torch.zeros(padded.size, dtype=torch.int8)

    def views(num_blocks: int) -> list[torch.Tensor]:
        return list(
            create_kv_cache_views(raw, spec, num_blocks, KVCacheLayout.LBHNC, padded, kernel_block_size=64)
        )

    reserved, committed = views(capacity), views(700)
    for view, after in zip(reserved, committed, strict=True):
        view = view.view(torch.uint8)
        check_paged_cache(view, layout)
        assert tuple(view.shape) == (capacity, 2, 64, layout.cell_bytes)
        assert view.stride() == (page, 64 * layout.cell_bytes, layout.cell_bytes, 1)
        assert after.shape[0] == 700 and after.stride() == view.stride()
        assert after.data_ptr() == view.data_ptr()
