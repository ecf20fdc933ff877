"""Shared fixtures: the real model and texts fetched by scripts/get_assets.sh.

In-process vLLM engines (VLLM_ENABLE_V1_MULTIPROCESSING=0) start in about two
seconds on this project's CPU machines; set before vLLM is imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Engines serve uncalibrated unless a test names a calibration file: a file a developer's
# `make serve` left in ~/.cache must not change what the tests measure (test_calibration.py,
# test_make_serve.py and test_gemma.py set their own).
os.environ.setdefault("NF4KV_CALIBRATION", "none")

# cuda_wheel_on_cpu: the CUDA wheel of vLLM at config level on CPU (make test-vllm033 /
# test-vllm034). triton_interpreted: the Triton kernels are imported in the interpreter's mode
# before any test module imports vLLM (which imports Triton), whatever subset or order of
# modules a run collects: Triton's own helpers keep the mode of its first import. Required:
# a missing or broken Triton fails the run, never skips its tests.
import cuda_wheel_on_cpu  # noqa: E402
import triton_interpreted  # noqa: E402, F401

cuda_wheel_on_cpu.allow_config_level()

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("ASSETS", REPO / ".assets"))
MODEL_DIR = ASSETS / "models" / "smollm2-135m"
TEXTS = ASSETS / "texts"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make assets` (scripts/get_assets.sh)")
    return path


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return _require(MODEL_DIR / "config.json").parent


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    """Gemma-3-270m base: head_dim 256, QK-norm, sliding and global layers (test_gemma.py)."""
    return _require(ASSETS / "models" / "gemma3-270m" / "config.json").parent


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct: Qwen2, key and value biases (test_qwen.py)."""
    return _require(ASSETS / "models" / "qwen2.5-coder-0.5b" / "config.json").parent


@pytest.fixture(scope="session")
def model_shape(model_dir) -> dict[str, int]:
    """What the KV cache of the test model holds per token, from its config.json."""
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return {
        "layers": config["num_hidden_layers"],
        "kv_heads": config.get("num_key_value_heads", config["num_attention_heads"]),
        "head_dim": head_dim,
    }


@pytest.fixture(scope="session")
def moby_dick() -> str:
    return _require(TEXTS / "moby_dick.txt").read_text()


@pytest.fixture(scope="session")
def sotu() -> str:
    return _require(TEXTS / "sotu_2000_2021.txt").read_text()
