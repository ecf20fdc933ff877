"""Plot bench_serve.py's serving tables: output tok/s vs auto and TPOT per workload and dtype.

    python scripts/plot_serving.py docs/results/serve-prefill-heavy.md \\
        docs/results/serve-decode-heavy.md --out docs/img/serving.png
    python scripts/plot_serving.py --summary docs/results/serve-*.md   # kv-bound rows, one table
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench_serve import CAPACITY_CONTROL


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of the first markdown table in ``path`` as dicts keyed by header."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return [dict(zip(header, row, strict=True)) for row in rows]


def kv_bound_summary(tables: list[Path]) -> str:
    """One markdown row per table: the kv-bound workload's output tok/s per dtype and vs auto, and
    nf4's share of the capacity control's (when the table has one)."""
    lines = ["| run | auto (tok/s) | fp8 | nf4 | auto, nf4's KV tokens | nf4 / control |",
             "|---|---|---|---|---|---|"]
    for path in tables:
        rows = {r["kv-cache-dtype"]: r for r in read_rows(path) if r["workload"].startswith("kv-bound")}
        cells = [rows["auto"]["output tok/s"]]
        for dtype in ("fp8", "nf4", CAPACITY_CONTROL):
            row = rows.get(dtype)
            cells.append(f"{row['output tok/s']} ({row['vs auto']})" if row else "-")
        control = rows.get(CAPACITY_CONTROL)
        share = float(rows["nf4"]["output tok/s"]) / float(control["output tok/s"]) if control else None
        cells.append(f"{share:.0%}" if share else "-")
        lines.append(f"| {path.stem} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", type=Path, help="markdown written by bench_serve.py --out")
    parser.add_argument("--out", type=Path, default=Path("docs/img/serving.png"))
    parser.add_argument("--summary", action="store_true",
                        help="print the kv-bound rows of all tables as one markdown table, no plot")
    args = parser.parse_args()
    if args.summary:
        print(kv_bound_summary(args.tables))
        return

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, dict[str, dict[str, str]]] = {}
    for path in args.tables:
        tag = path.stem.removeprefix("serve-").replace("-uniproc", "\n(uniproc)")
        for row in read_rows(path):
            name = row["workload"].split(" (")[0]  # "kv-bound (1000 prompt tok, ...)" -> "kv-bound"
            groups.setdefault(f"{name}\n{tag}", {})[row["kv-cache-dtype"]] = row
    dtypes = ["auto", "fp8", "nf4"]
    names = list(groups)
    fig, (ax_tput, ax_tpot) = plt.subplots(2, 1, figsize=(max(9.0, 1.6 * len(groups)), 8.5))
    width = 0.26
    for i, dtype in enumerate(dtypes):
        xs = [j + (i - 1) * width for j in range(len(names))]
        ratio = [float(groups[n][dtype]["vs auto"].rstrip("x")) for n in names]
        tpot = [float(groups[n][dtype]["TPOT p50 / p90 (ms)"].split("/")[0]) for n in names]
        bars = ax_tput.bar(xs, ratio, width, label=dtype)
        ax_tput.bar_label(bars, fmt="%.2fx", fontsize=7)
        ax_tpot.bar(xs, tpot, width, label=dtype)
    ceiling = [(j, float(groups[n][CAPACITY_CONTROL]["vs auto"].rstrip("x")))
               for j, n in enumerate(names) if CAPACITY_CONTROL in groups[n]]
    if ceiling:  # bench_serve.py --capacity-control: auto with nf4's KV tokens
        ax_tput.hlines([r for _, r in ceiling], [j - 1.5 * width for j, _ in ceiling],
                       [j + 1.5 * width for j, _ in ceiling], colors="black", lw=1.5,
                       label="auto with nf4's KV tokens (capacity alone)")
    ax_tput.axhline(1.0, color="gray", lw=0.8)
    ax_tput.axhline(2.0, color="red", lw=0.8, ls="--", label="KV-bound target (2x)")
    ax_tput.axhline(0.8, color="orange", lw=0.8, ls="--", label="not-KV-bound target (0.8x)")
    ax_tput.set_ylabel("output tokens/s vs auto")
    ax_tpot.set_ylabel("TPOT p50 (ms)")
    for ax in (ax_tput, ax_tpot):
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.legend(fontsize=7)
    title = "vllm serve, SmolLM2-135M, 64 MiB KV for every dtype, 2 CPU cores (bench_serve.py)"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
