"""Compile every NF4 kernel for a CUDA target on a machine without a GPU.

The Triton interpreter runs the kernels' Python semantics, not the compiler:
layouts, ``tl.dot`` shape rules, register pressure and the PTX of ``div_rn`` are
only seen by compiling. The store and load kernels' PTX is also checked for
contracted FMAs and approximate division, which would break bit-exactness with
the reference on the GPU. This script runs the real launchers on CPU tensors with a
stand-in Triton driver that reports a CUDA target, and turns every launch into
``warmup`` (compile, never run), using the ``ptxas`` shipped in the Triton wheel.

A developer tool, not part of the package: it patches Triton (``JITFunction.__getitem__``,
the active driver) for the whole process, and compiles the tests' ``load_kv_nf4``
(``tests/triton_load.py``) beside the package's kernels. Run it in a process of its own
(it must not see ``TRITON_INTERPRET=1``), from the repository root::

    python tests/compile_check.py [--arch 90] [--resources]

``--resources`` prints registers and stack (spills) per kernel from ``cuobjdump``,
and the dynamic shared memory Triton asks for.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's vllm_nf4kv, installed or not

if TYPE_CHECKING:
    from vllm_nf4kv.format import CellLayout


def _install_fake_driver(arch: int) -> None:
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import ty_to_cpp
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class _CompileOnlyDriver:
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty):
            return ty_to_cpp(ty)

    driver.set_active(_CompileOnlyDriver())
    JITFunction.__getitem__ = lambda self, grid: (  # noqa: E731
        lambda *args, **kwargs: self.run(*args, grid=grid, warmup=True, **kwargs)
    )


def _swapped_schemes(head_dim: int) -> CellLayout:
    """The shipped layout's schemes the other way round: K per-group ue5m3, V two-level with 3 bits.

    The shipped layout compiles the K rows' two-level path and the V rows' per-group one; this
    compiles each scheme on the other row (every constant from the format, as the tests use it).
    """
    from vllm_nf4kv.format import KV_CACHE_DTYPE, CellLayout, RowFormat, ScaleScheme, format_for

    shipped = format_for(KV_CACHE_DTYPE, head_dim)
    key = RowFormat(head_dim, shipped.key.group_size * 2, shipped.value.search_steps)
    value = RowFormat(head_dim, shipped.key.group_size, shipped.key.search_steps, ScaleScheme.TWO_LEVEL, 3)
    return CellLayout(key, value)


def _configs() -> Iterator[tuple[str, dict]]:
    """(name, parameters) of the configurations compiled: every head size, dtype path and scheme."""
    import torch

    for head_dim in (64, 128, 256, 96):
        yield f"store d{head_dim}", {"kind": "store", "head_dim": head_dim, "dtype": torch.bfloat16}
    yield (
        "store d128 swapped schemes",
        {"kind": "store", "head_dim": 128, "dtype": torch.bfloat16, "layout": _swapped_schemes(128)},
    )
    yield "load d128 bf16", {"kind": "load", "head_dim": 128, "dtype": torch.bfloat16}
    yield "load d64 fp32", {"kind": "load", "head_dim": 64, "dtype": torch.float32}
    yield (
        "load d128 bf16 swapped schemes",
        {"kind": "load", "head_dim": 128, "dtype": torch.bfloat16, "layout": _swapped_schemes(128)},
    )
    for head_dim, group, dtype, split, calibrated in (
        (128, 8, torch.bfloat16, False, True),
        (128, 8, torch.bfloat16, True, True),
        (64, 1, torch.float16, True, False),
        (256, 4, torch.bfloat16, False, False),
        (96, 4, torch.bfloat16, True, True),
        (128, 4, torch.float32, False, False),
    ):
        name = f"attention d{head_dim} gqa{group} {str(dtype)[6:]} {'split' if split else 'whole'}"
        params = {"kind": "attention", "head_dim": head_dim, "group": group, "dtype": dtype, "split": split}
        yield name + (" calibrated" if calibrated else ""), {**params, "calibrated": calibrated}
    yield (
        "attention d128 gqa4 bfloat16 whole swapped schemes",
        {
            "kind": "attention",
            "head_dim": 128,
            "group": 4,
            "dtype": torch.bfloat16,
            "split": False,
            "layout": _swapped_schemes(128),
        },
    )
    yield (
        "store d128 calibrated",
        {"kind": "store", "head_dim": 128, "dtype": torch.bfloat16, "calibrated": True},
    )


def _run_config(params: dict) -> list:
    import torch
    import triton_load  # tests/triton_load.py, beside this file (on sys.path when run as a script)

    from vllm_nf4kv.format import KV_CACHE_DTYPE, format_for
    from vllm_nf4kv.kernels import triton_attention, triton_store

    layout = params.get("layout") or format_for(KV_CACHE_DTYPE, params["head_dim"])
    heads, block_size = 2, 16
    cache = torch.zeros(4, heads, block_size, layout.cell_bytes, dtype=torch.uint8)
    compiled = []
    table = torch.ones(heads, layout.head_dim)
    if params["kind"] == "store":
        x = torch.zeros(3, heads, layout.head_dim, dtype=params["dtype"])
        tables = {}
        if params.get("calibrated"):
            tables = {"key_offset": table, "key_scale": table, "value_offset": table}
        triton_store.store_kv_nf4(cache, x, x, torch.arange(3), layout, **tables)
        compiled.append(triton_store._store_kv_nf4_kernel)
    elif params["kind"] == "load":
        table = torch.zeros(2, 4, dtype=torch.int32)
        triton_load.load_kv_nf4(
            cache,
            table,
            torch.tensor([5, 9], dtype=torch.int32),
            layout,
            out_dtype=params["dtype"],
            max_seq_len=9,
        )
        compiled.append(triton_load._load_kv_nf4_kernel)
    else:
        q = torch.zeros(2, heads * params["group"], layout.head_dim, dtype=params["dtype"])
        q_table = table.repeat_interleave(params["group"], 0)
        tables = {"query_scale": q_table, "output_offset": q_table} if params.get("calibrated") else {}
        triton_attention.nf4_paged_attention(
            q,
            cache,
            torch.zeros(2, 4, dtype=torch.int32),
            torch.tensor([0, 1, 2], dtype=torch.int32),
            torch.tensor([5, 9], dtype=torch.int32),
            layout,
            0.1,
            split=params["split"],
            max_chunks=4,
            **tables,
        )
        compiled.append(triton_attention._nf4_attention_kernel)
        if params["split"]:
            compiled.append(triton_attention._nf4_attention_merge_kernel)
    return compiled


# Kernels whose arithmetic must round operation by operation: the store's calibration, fp64
# rotation and scale search and the load's level * scale (as torch rounds them), the merge of
# chunk states (as the attention kernel merges them): no contracted FMAs, no approximate division.
_EXACT_KERNELS = ("_store_kv_nf4_kernel", "_load_kv_nf4_kernel", "_nf4_attention_merge_kernel")
_INEXACT_PTX = ("fma.rn.f32", "fma.rn.f64", "div.full.f32", "div.approx.f32", "div.approx.ftz.f32")


def _exactness_problem(kernel_name: str, ptx: str) -> str | None:
    if kernel_name not in _EXACT_KERNELS:
        return None
    found = [op for op in _INEXACT_PTX if op in ptx]
    return f"{kernel_name} PTX contains {found} (breaks bit-exactness)" if found else None


def _resources(cubin: bytes, workdir: Path) -> str:
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    text = subprocess.run(
        [str(cuobjdump), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=False
    ).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", text)
    return f"regs {found[1]} stack {found[2]}" if found else "regs n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    parser.add_argument("--resources", action="store_true", help="print registers / stack per kernel")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    _install_fake_driver(args.arch)
    import tempfile

    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, params in _configs():
            try:
                kernels = _run_config(params)
            except Exception as exc:  # report every configuration, then fail
                failures += 1
                print(f"FAIL {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            line = f"ok   {name}"
            for kernel in kernels:
                for compiled in kernel.device_caches[0][0].values():
                    problem = _exactness_problem(compiled.name, compiled.asm["ptx"])
                    if problem:
                        failures += 1
                        line = f"FAIL {name}: {problem}"
                    elif args.resources:
                        line += (
                            f" | {compiled.name}: {_resources(compiled.asm['cubin'], Path(tmp))}"
                            f" shared {compiled.metadata.shared} B"
                        )
                kernel.device_caches[0][0].clear()
            print(line, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
