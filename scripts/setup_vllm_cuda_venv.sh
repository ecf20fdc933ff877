#!/usr/bin/env bash
# A venv with the CUDA wheel of vLLM $VERSION (0.33.0, 0.34.0, ...) for testing the
# config-level path on a CPU machine: the dtype hook, --kv-cache-dtype nf4 validation,
# create_engine_config, backend selection, customize_spec, the TTL block pool and the
# behaviour self-checks (shared NOTES "Testing the vLLM 0.33 path without a GPU").
#
# Downloads are shared: torch (a CUDA build, ~5.5 GB installed) goes once into
# $BASE (.venv-cuda-base), which each version's venv reads through a .pth file, and
# pip's own cache serves the requirements both versions have in common.
# vLLM is installed --no-deps; its requirements are read from the wheel, minus the
# GPU-only ones and the torch family (torch 2.14.1 lies on this disk; the wheels
# pin 2.14.0, which only matters for their CUDA kernels, never loaded here).
set -euo pipefail
VERSION=${VERSION:?set VERSION, e.g. VERSION=0.34.0}
minor=${VERSION%.*}  # 0.34.0 -> 0.34
VENV=${VENV:-.venv-vllm${minor//./}}
BASE=${BASE:-.venv-cuda-base}
PY=${PYTHON:-python3}

if [ ! -f "$BASE/.installed" ]; then
  rm -rf "$BASE"
  "$PY" -m venv "$BASE"
  "$BASE/bin/pip" install -q torch==2.14.1 pytest pytest-timeout 'hypothesis>=6'
  touch "$BASE/.installed"
fi

rm -rf "$VENV"
"$PY" -m venv "$VENV"
site() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
# The base's packages (torch, pytest) are importable and visible to pip in $VENV.
realpath "$(site "$BASE")" > "$(site "$VENV")/cuda_base.pth"
"$VENV/bin/pip" install -q --no-deps "vllm==$VERSION"
"$VENV/bin/python" - > "$VENV/vllm-requirements.txt" <<'PY'
import importlib.metadata as m
skip = {"torch", "torchaudio", "torchvision", "torchcodec", "pynvvideocodec",
        "flashinfer-python", "apache-tvm-ffi"}
for req in m.requires("vllm") or []:
    if "extra ==" in req:
        continue
    name = req.split(";")[0].split("[")[0]
    for sep in "<>=!~ ":
        name = name.split(sep)[0]
    if name.strip().lower() not in skip:
        print(req)
PY
"$VENV/bin/pip" install -q -r "$VENV/vllm-requirements.txt"
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/python" -c 'import torch, vllm; print("vllm", vllm.__version__, "torch", torch.__version__)'
touch "$VENV/.installed"
