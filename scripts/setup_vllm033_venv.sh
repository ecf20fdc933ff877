#!/usr/bin/env bash
# A venv with the CUDA wheel of vLLM 0.33 for testing the 0.33 registration path
# on a CPU machine (config level: dtype hook, validation, backend selection,
# customize_spec). See shared NOTES "Testing the vLLM 0.33 path without a GPU".
# vLLM is installed --no-deps; its requirements are read from the wheel, minus
# the GPU-only ones and the torch family (torch 2.14.1 lies on this disk).
set -euo pipefail
VENV=${VENV:-.venv-033}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.14.1
"$VENV/bin/pip" install -q --no-deps vllm==0.33.0
wheel_meta=$("$VENV/bin/python" - <<'PY'
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
)
printf '%s\n' "$wheel_meta" > "$VENV/vllm-requirements.txt"
"$VENV/bin/pip" install -q -r "$VENV/vllm-requirements.txt"
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/pip" install -q pytest
touch "$VENV/.installed"
