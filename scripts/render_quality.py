"""Render the lm-eval results of scripts/eval_quality.sh as docs/quality.md table + docs/img/quality.png.

    .venv/bin/python scripts/render_quality.py --results .assets/quality [--kv-memory 268435456]

Reads the newest ``results_*.json`` under ``RESULTS/<dtype>/`` and the KV capacity line of
``RESULTS/server_<dtype>.log``; rewrites the block between the RESULTS markers in docs/quality.md
(or prints the table when the markers are missing).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("auto", "fp8", "nf4")
# (task, metric, label, lower is better)
METRICS = [
    ("nf4kv_ppl_moby", "word_perplexity", "Moby Dick word PPL", True),
    ("nf4kv_ppl_sotu", "word_perplexity", "SOTU word PPL", True),
    ("nf4kv_ppl_moby", "bits_per_byte", "Moby Dick bits/byte", True),
    ("nf4kv_ppl_sotu", "bits_per_byte", "SOTU bits/byte", True),
    ("nf4kv_lastword_moby", "acc", "Moby Dick last-word acc", False),
    ("nf4kv_lastword_sotu", "acc", "SOTU last-word acc", False),
    ("nf4kv_lastword_moby", "perplexity", "Moby Dick last-word PPL", True),
    ("nf4kv_lastword_sotu", "perplexity", "SOTU last-word PPL", True),
    ("nf4kv_cont_moby", "exact_match", "Moby Dick next-3-words EM", False),
    ("nf4kv_cont_sotu", "exact_match", "SOTU next-3-words EM", False),
    ("nf4kv_cont_moby", "first_word", "Moby Dick next-word match", False),
    ("nf4kv_cont_sotu", "first_word", "SOTU next-word match", False),
]
BEGIN, END = "<!-- RESULTS BEGIN -->", "<!-- RESULTS END -->"


def load(results: Path) -> dict[str, dict]:
    out = {}
    for dtype in DTYPES:
        files = sorted((results / dtype).rglob("results_*.json"))
        if not files:
            continue
        data = json.loads(files[-1].read_text())
        row = {"n": data.get("n-samples", {}), "res": data["results"]}
        log = results / f"server_{dtype}.log"
        m = re.search(r"KV cache size: ([\d,]+) tokens", log.read_text()) if log.exists() else None
        row["capacity"] = int(m.group(1).replace(",", "")) if m else None
        out[dtype] = row
    return out


def value(row: dict, task: str, metric: str) -> float | None:
    return row["res"].get(task, {}).get(f"{metric},none")


def table(rows: dict[str, dict]) -> str:
    dtypes = list(rows)
    lines = ["| metric | docs | " + " | ".join(dtypes) + " | "
             + " | ".join(f"{d} Δ vs auto" for d in dtypes if d != "auto") + " |"]
    lines.append("|---" * (2 + len(dtypes) + len(dtypes) - ("auto" in dtypes)) + "|")
    cap = ["KV capacity (tokens)", ""] + [f"{rows[d]['capacity']:,}" if rows[d]["capacity"] else "?"
                                         for d in dtypes]
    base_cap = rows.get("auto", {}).get("capacity")
    cap += [f"{rows[d]['capacity'] / base_cap:.2f}x" if base_cap and rows[d]["capacity"] else ""
            for d in dtypes if d != "auto"]
    lines.append("| " + " | ".join(cap) + " |")
    for task, metric, label, _lower in METRICS:
        vals = [value(rows[d], task, metric) for d in dtypes]
        n = rows[dtypes[0]]["n"].get(task, {}).get("effective", "")
        cells = [label, str(n)] + ["" if v is None else f"{v:.4g}" for v in vals]
        base = value(rows["auto"], task, metric) if "auto" in rows else None
        for d, v in zip(dtypes, vals, strict=True):
            if d == "auto":
                continue
            if v is None or base is None:
                cells.append("")
            elif metric in ("acc", "exact_match", "first_word"):
                cells.append(f"{(v - base) * 100:+.1f} pts")
            else:
                cells.append(f"{(v / base - 1) * 100:+.2f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = [d for d in DTYPES if d in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    groups = [
        ("word PPL, Δ vs auto (%)", [m for m in METRICS if m[1] == "word_perplexity"], "rel"),
        ("last-word acc (%)", [m for m in METRICS if m[1] == "acc"], "abs"),
        ("next-3-words EM (%)", [m for m in METRICS if m[1] == "exact_match"], "abs"),
    ]
    width = 0.8 / len(dtypes)
    for ax, (title, metrics, kind) in zip(axes, groups, strict=True):
        for i, d in enumerate(dtypes):
            ys = []
            for task, metric, _label, _lower in metrics:
                v = value(rows[d], task, metric)
                base = value(rows["auto"], task, metric) if "auto" in rows else None
                if kind == "rel":
                    ys.append(0.0 if v is None or not base else (v / base - 1) * 100)
                else:
                    ys.append(0.0 if v is None else v * 100)
            xs = [j + i * width for j in range(len(metrics))]
            ax.bar(xs, ys, width, label=d)
        ax.set_xticks([j + width * (len(dtypes) - 1) / 2 for j in range(len(metrics))])
        ax.set_xticklabels(["Moby Dick", "SOTU"])
        ax.set_title(title)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0].legend()
    fig.suptitle(f"{model}, vLLM 0.32 CPU, lm-eval local-completions, same KV budget")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(REPO / ".assets/quality"))
    parser.add_argument("--kv-memory", type=int, default=268435456)
    parser.add_argument("--doc", default=str(REPO / "docs/quality.md"))
    parser.add_argument("--png", default=str(REPO / "docs/img/quality.png"))
    parser.add_argument("--model-title", default="SmolLM2-135M", help="the model's name in the plot title")
    args = parser.parse_args()

    rows = load(Path(args.results))
    if not rows:
        raise SystemExit(f"no results under {args.results}")
    md = table(rows)
    print(md)
    plot(rows, Path(args.png), args.model_title)
    doc = Path(args.doc)
    if doc.exists() and BEGIN in doc.read_text():
        text = doc.read_text()
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        block = (f"{BEGIN}\nKV budget {args.kv_memory / 2**20:.0f} MiB for every dtype.\n\n{md}\n\n"
                 f"![quality](img/{Path(args.png).name})\n{END}")
        doc.write_text(head + block + tail)
        print(f"wrote {doc} and {args.png}")


if __name__ == "__main__":
    main()
