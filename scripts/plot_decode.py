"""Plot bench_cpu_decode.py's table: nf4's decode attention time over vLLM's bf16, by context.

One line per (model shape, batch); below 1.0 nf4 is faster. The table's provenance line
(revision, CPU) goes under the title.

    python scripts/plot_decode.py docs/results/cpu-decode-vs-bf16.md --out docs/img/cpu-decode-vs-bf16.png
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from plot_serving import read_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    for row in read_rows(args.table):
        batch, context = row["sequences x context"].split(" x ")
        model = row["model shape"].split(" (")[0]
        ratio = float(row["nf4 / bf16"].rstrip("x"))
        lines[(model, int(batch))].append((int(context.replace(",", "")), ratio))
    source = next(line for line in args.table.read_text().splitlines() if "git " in line)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for (model, batch), points in sorted(lines.items()):
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", linestyle="-" if batch > 1 else "--", label=f"{model}, batch {batch}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens per sequence)")
    ax.set_ylabel("nf4 time / vLLM bf16 time (lower is better)")
    ax.set_title("CPU decode attention per layer: nf4 kernels vs vLLM's bf16 op", fontsize=11)
    ax.text(0.01, 0.01, source.split("passes. ")[-1].rstrip("."), transform=ax.transAxes, fontsize=7)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
