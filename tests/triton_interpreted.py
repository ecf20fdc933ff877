"""The Triton kernel modules, imported under the interpreter where there is no GPU.

Conftest-free switch: on a machine without CUDA, and unless ``TRITON_INTERPRET`` is
already set, this module sets ``TRITON_INTERPRET=1`` *before* it imports Triton
(``@triton.jit`` reads it when a kernel is defined, and Triton reads it again at run
time), then restores the environment as soon as its imports are done, so modules
collected later see the session's own setting; test modules wrap :func:`interpreter_env`
in a module-scoped autouse fixture to set it again only while their tests run. If
another module imported the kernels earlier in the other mode, they are re-imported in
this one. Caveat: Triton's own ``triton.language`` helpers keep the mode of the first
``import triton`` in the process. Triton is required (torch pulls it on Linux x86-64): a
missing or broken Triton fails the run instead of turning every Triton test into a skip.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator

import torch

_SET_HERE = os.environ.get("TRITON_INTERPRET") is None and not torch.cuda.is_available()
if _SET_HERE:
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
try:
    try:
        import triton
    except ImportError as error:
        raise ImportError(
            f"Triton does not import ({error}): the Triton kernels' tests need it (torch installs "
            f"it on Linux x86-64; `make install`)"
        ) from error
    # in import order (each module imports the ones before it), so a reload sees reloaded helpers
    _MODULES = [importlib.import_module(f"vllm_nf4kv.kernels.{name}")
                for name in ("triton_codec", "triton_rotation", "triton_quantize", "triton_store",
                             "triton_attention_kernels", "triton_attention")]
    _MODULES.append(importlib.import_module("triton_load"))  # tests/triton_load.py: load_kv_nf4
    if any(not isinstance(kernel, triton.runtime.jit.JITFunction) != INTERPRET
           for kernel in (_MODULES[3]._store_kv_nf4_kernel, _MODULES[5]._nf4_attention_kernel,
                          _MODULES[6]._load_kv_nf4_kernel)):
        _MODULES = [importlib.reload(module) for module in _MODULES]  # imported earlier in the other mode
finally:
    if _SET_HERE:
        os.environ.pop("TRITON_INTERPRET", None)

triton_codec, triton_store, triton_attention, triton_load = (_MODULES[i] for i in (0, 3, 5, 6))


def interpreter_env() -> Iterator[None]:
    """TRITON_INTERPRET=1 while a module's tests run (only where this module set it)."""
    if _SET_HERE:
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    if _SET_HERE:
        os.environ.pop("TRITON_INTERPRET", None)
