"""The format-choice matrix of docs/format.md: models x texts x contexts through ``vllm-nf4kv ablate``.

Each cell is one ``vllm-nf4kv ablate --json`` run (fp32 model, every K/V fake-quantized after
RoPE, 8,192 tokens in windows of ``--ctx``); ``nf4`` is exactly what ``--kv-cache-dtype nf4``
stores with the model's calibration from ``vllm-nf4kv calibrate`` (made on the built-in
Lincoln text, so neither evaluation text). Rows per model:

* ``fp8`` and ``int4tok`` (vLLM's ``int4_per_token_head``, emulated): the references;
* the previous default (``nf4-g{D/4}-ue5m3-s4`` for K and V);
* the new layout uncalibrated (``format_for``'s rows) and ``nf4`` (the same rows, calibrated).

Writes every run's JSON under ``--out`` and prints the markdown table::

    python scripts/ablate_matrix.py --out docs/results/ablate-matrix --jobs 2
    python scripts/ablate_matrix.py --out docs/results/ablate-matrix --texts Emails --ctx 1024

(after ``vllm-nf4kv calibrate`` of each model, which ``nf4`` reads from the default location).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {"SmolLM2-135M": ".assets/models/smollm2-135m", "Gemma-3-270m": ".assets/models/gemma3-270m"}
TEXTS = {
    "Moby Dick": ".assets/texts/moby_dick.txt",
    "State of the Union": ".assets/texts/sotu_2000_2021.txt",
    "Emails": ".assets/texts/emails_easy_ham.txt",  # held out: never used to choose the format
}


def head_dim(model: str) -> int:
    config = json.loads((REPO / model / "config.json").read_text())
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def candidates(model: str) -> list[str]:
    """The fixed rows (``nf4`` runs on its own: it changes whenever the calibration does)."""
    from vllm_nf4kv.tools.kv_formats import shipped_spec

    d = head_dim(model)
    previous = f"nf4-g{d // 4}-ue5m3-s4"
    return ["fp8", "int4tok", previous, shipped_spec(d)]


def run_cell(model: str, text: str, ctx: int, out: Path, tokens: int, extra: list[str]) -> dict:
    """The cell's report: the fixed rows' run, then ``nf4``'s (a file each, rerun only when missing)."""
    stem = f"{Path(model).name}-{Path(text).stem}-ctx{ctx}"
    fixed = _run(model, text, ctx, out / f"{stem}.json", tokens, candidates(model), extra)
    stored = _run(model, text, ctx, out / f"{stem}-nf4.json", tokens, ["nf4"], extra)
    rows = [r for r in fixed["results"] if r["candidate"] != "nf4"] + stored["results"]
    return {**fixed, "results": rows, "stored_calibration": stored["stored_calibration"]}


def _run(model: str, text: str, ctx: int, path: Path, tokens: int, specs: list[str], extra: list[str]):
    if not path.exists():
        command = [str(REPO / ".venv/bin/vllm-nf4kv"), "ablate", "--model", model, "--text", text]
        command += ["--tokens", str(tokens), "--ctx", str(ctx), "--threads", "1", "--json"]
        command += ["--candidates", ",".join(specs), *extra]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        if result.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        path.write_text(result.stdout)
    return json.loads(path.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="docs/results/ablate-matrix")
    parser.add_argument("--jobs", type=int, default=2, help="ablate runs at once (each on one thread)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--ctx", default="1024,4096")
    parser.add_argument(
        "--texts", default="Moby Dick,State of the Union", help="comma-separated names of TEXTS"
    )
    parser.add_argument("extra", nargs="*", help="more ablate arguments after --")
    args = parser.parse_args()
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    texts = {name: TEXTS[name] for name in args.texts.split(",")}
    cells = [
        (m_name, t_name, ctx)
        for m_name in MODELS
        for t_name in texts
        for ctx in (int(c) for c in args.ctx.split(","))
    ]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            cell: pool.submit(
                run_cell, MODELS[cell[0]], texts[cell[1]], cell[2], out, args.tokens, args.extra
            )
            for cell in cells
        }
        reports = {cell: future.result() for cell, future in futures.items()}
    for m_name in MODELS:
        model_cells = [c for c in cells if c[0] == m_name]
        rows = [r["candidate"] for r in reports[model_cells[0]]["results"]]
        print(f"\n{m_name} (head_dim {reports[model_cells[0]]['head_dim']}), ΔPPL vs fp32:\n")
        print("| candidate | bits/value | " + " | ".join(f"{t} ctx {c}" for _, t, c in model_cells) + " |")
        print("|---|---:|" + "---:|" * len(model_cells))
        for row in rows:
            found = [next(r for r in reports[c]["results"] if r["candidate"] == row) for c in model_cells]
            cells_text = " | ".join(f"{f['delta_ppl_pct']:+.2f}%" for f in found)
            print(f"| `{row}` | {found[0]['bits_per_value']:.3g} | {cells_text} |")
        print(f"\nnf4: {reports[model_cells[0]].get('stored_calibration')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
