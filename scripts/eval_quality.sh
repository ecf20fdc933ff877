#!/usr/bin/env bash
# lm-eval quality of auto / fp8 / nf4 through `vllm serve` (one server per dtype, same settings).
#
#   bash scripts/eval_quality.sh [DTYPES...]      # default: auto fp8 nf4
#   env: PORT (18731), KV_MEMORY (268435456), LIMIT (unset = all docs), CONCURRENT (4), OUT (.assets/quality),
#        MODEL (.assets/models/smollm2-135m), NAME (smollm2), DOC (docs/quality.md), PNG (docs/img/quality.png),
#        TITLE (SmolLM2-135M: the plot's title)
#   Gemma: MODEL=.assets/models/gemma3-270m NAME=gemma3 OUT=.assets/quality-gemma TITLE=Gemma-3-270m \
#          DOC=docs/quality-gemma.md PNG=docs/img/quality-gemma.png bash scripts/eval_quality.sh
#   Qwen:  MODEL=.assets/models/qwen2.5-coder-0.5b NAME=qwen OUT=.assets/quality-qwen \
#          TITLE=Qwen2.5-Coder-0.5B DOC=docs/quality-qwen.md PNG=docs/img/quality-qwen.png \
#          bash scripts/eval_quality.sh
#
# nf4 serves with the model's calibration (made first, once, as `make serve` does).
#
# Builds the JSONL documents (scripts/make_eval_data.py), runs the local tasks in
# scripts/lm_eval_tasks/ (tag nf4kv_quality) with lm_eval's local-completions model, then
# renders docs/quality.md and docs/img/quality.png (scripts/render_quality.py).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
MODEL=${MODEL:-.assets/models/smollm2-135m}
NAME=${NAME:-smollm2}
DOC=${DOC:-docs/quality.md}
PNG=${PNG:-docs/img/quality.png}
TITLE=${TITLE:-SmolLM2-135M}
PORT=${PORT:-18731}
KV_MEMORY=${KV_MEMORY:-268435456}
CONCURRENT=${CONCURRENT:-4}
OUT=${OUT:-.assets/quality}
DTYPES=("${@:-auto fp8 nf4}")
read -r -a DTYPES <<< "${DTYPES[*]}"
export VLLM_ENABLE_V1_MULTIPROCESSING=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$VENV/bin/python" scripts/make_eval_data.py
"$VENV/bin/vllm-nf4kv" calibrate "$MODEL" --if-missing
unset NF4KV_CALIBRATION  # serve as users do: the model's file from the default location
mkdir -p "$OUT"
SERVER_PID=
stop_server() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=
}
trap stop_server EXIT INT TERM

for dtype in "${DTYPES[@]}"; do
  echo "== $dtype: starting vllm serve on 127.0.0.1:$PORT"
  "$VENV/bin/vllm" serve "$MODEL" --served-model-name "$NAME" --kv-cache-dtype "$dtype" \
    --host 127.0.0.1 --port "$PORT" --enforce-eager --max-model-len 2048 \
    --kv-cache-memory-bytes "$KV_MEMORY" --seed 0 > "$OUT/server_$dtype.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 240); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -30 "$OUT/server_$dtype.log"; exit 1; }
    sleep 1
  done
  start=$(date +%s)
  "$VENV/bin/lm_eval" --model local-completions \
    --model_args "model=$NAME,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer=$MODEL,tokenizer_backend=huggingface,num_concurrent=$CONCURRENT,max_retries=3,max_length=2048" \
    --tasks nf4kv_quality --include_path scripts/lm_eval_tasks \
    ${LIMIT:+--limit "$LIMIT"} --seed 0 --output_path "$OUT/$dtype"
  echo "== $dtype: lm_eval took $(( $(date +%s) - start )) s"
  stop_server
done
"$VENV/bin/python" scripts/render_quality.py --results "$OUT" --kv-memory "$KV_MEMORY" --doc "$DOC" --png "$PNG" \
  --model-title "$TITLE"
