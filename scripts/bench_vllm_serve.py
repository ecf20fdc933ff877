"""auto / fp8 / nf4 served by `vllm serve` and driven by vLLM's own client, `vllm bench serve`.

One server per (dtype, KV budget) with otherwise identical flags (``--enforce-eager
--max-model-len 2048 --seed 0``); against each, ``vllm bench serve --backend openai
--ignore-eos --seed 0 --save-result`` runs the workloads that budget is for:

* 512 MiB of KV (no format is short of cache: kernel speed alone)
  - prefill-heavy: random dataset, 1,000 tokens in / 16 out, concurrency 8
  - not KV-bound: random dataset, 100 in / 64 out, concurrency 2
* 64 MiB of KV (capacity decides how many sequences run at once)
  - decode-heavy: random dataset, 1,000 in / 256 out, concurrency 16
  - prefix-repetition: 4 shared 768-token prefixes + 128 unique tokens, 64 out, concurrency 8
    (prefix caching on, vLLM's default)
  - the capacity control: auto given the KV bytes that hold as many tokens as nf4's 64 MiB
    (decode-heavy only): what nf4's capacity buys at bf16's kernel costs.

Writes a markdown table (output tok/s and its ratio to auto, mean TTFT, mean TPOT, KV tokens)
with the revision and CPU, and keeps vLLM's JSON results beside it.

    python scripts/bench_vllm_serve.py --out docs/results/vllm-bench-serve.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench_serve import MODEL, auto_bytes_per_token, capacity
from provenance import provenance

from vllm_nf4kv.tools.loopback_server import LoopbackServer, serve_env

MIB = 2**20
SERVER_FLAGS = ["--enforce-eager", "--max-model-len", "2048", "--seed", "0"]


@dataclass(frozen=True)
class Workload:
    name: str
    kv_bytes: int
    args: tuple[str, ...]
    prompts: int


RANDOM = ("--dataset-name", "random", "--random-range-ratio", "0")
WORKLOADS = [
    Workload("prefill-heavy", 512 * MIB, (*RANDOM, "--random-input-len", "1000", "--random-output-len", "16",
                                          "--max-concurrency", "8"), 32),
    Workload("not KV-bound", 512 * MIB, (*RANDOM, "--random-input-len", "100", "--random-output-len", "64",
                                         "--max-concurrency", "2"), 32),
    Workload("decode-heavy", 64 * MIB, (*RANDOM, "--random-input-len", "1000", "--random-output-len", "256",
                                        "--max-concurrency", "16"), 32),
    Workload("prefix-repetition", 64 * MIB, (
        "--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "768",
        "--prefix-repetition-suffix-len", "128", "--prefix-repetition-num-prefixes", "4",
        "--prefix-repetition-output-len", "64", "--max-concurrency", "8"), 32),
]
CONTROL = "auto, nf4's KV tokens"


def slug(*parts: str) -> str:
    return "-".join(p.replace(" ", "_").replace(",", "").replace("'", "") for p in parts)


def bench(url: str, model: Path, workload: Workload, result: Path, prompts: int) -> dict:
    """One `vllm bench serve` run of `prompts` requests; its saved JSON."""
    vllm = Path(sys.executable).with_name("vllm")
    command = [
        str(vllm), "bench", "serve", "--backend", "openai", "--base-url", url, "--model", str(model),
        "--num-prompts", str(prompts), "--ignore-eos", "--seed", "0", "--disable-tqdm",
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name, *workload.args,
    ]
    run = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if run.returncode:
        tail = "\n".join(run.stderr.splitlines()[-20:])
        raise RuntimeError(f"vllm bench serve failed ({run.returncode}):\n{tail}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["auto", "fp8", "nf4"])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--out", type=Path, required=True, help="markdown; JSON results go to OUT's stem/")
    parser.add_argument("--num-prompts", type=int, help="instead of each workload's own (a quick try)")
    parser.add_argument("--workloads", nargs="+", choices=[w.name for w in WORKLOADS],
                        help="only these (default: all)")
    args = parser.parse_args()
    results_dir = args.out.with_suffix("")
    results_dir.mkdir(parents=True, exist_ok=True)
    workloads = [w for w in WORKLOADS if not args.workloads or w.name in args.workloads]
    rows: dict[str, list[tuple[str, int | None, dict]]] = {w.name: [] for w in workloads}
    budgets = sorted({w.kv_bytes for w in workloads})
    servers = [(dtype, dtype, budget) for budget in budgets for dtype in args.dtypes]
    for label, dtype, kv_bytes in servers:
        log = results_dir / f"server-{slug(label)}-{kv_bytes // MIB}MiB.log"
        flags = [*SERVER_FLAGS, "--kv-cache-dtype", dtype, "--kv-cache-memory-bytes", str(kv_bytes)]
        with LoopbackServer.serve(args.model, log, *flags, env=serve_env()) as server:
            server.wait_ready(timeout_s=600)
            tokens = capacity(log)
            for workload in workloads:
                if (workload.name != "decode-heavy") if label == CONTROL else (workload.kv_bytes != kv_bytes):
                    continue
                result = results_dir / f"{slug(workload.name, label)}.json"
                data = bench(server.url, args.model, workload, result, args.num_prompts or workload.prompts)
                rows[workload.name].append((label, tokens, data))
                print(f"{workload.name} {label}: {data['output_throughput']:.1f} output tok/s", flush=True)
        wants_control = any(w.name == "decode-heavy" for w in workloads) and "auto" in args.dtypes
        if dtype == "nf4" and kv_bytes == 64 * MIB and tokens and wants_control:
            servers.append((CONTROL, "auto", tokens * auto_bytes_per_token(args.model)))
    lines = [
        f"`vllm bench serve` against `vllm serve {args.model.name}` ({' '.join(SERVER_FLAGS)}), "
        f"{provenance('vllm_nf4kv', 'scripts/bench_vllm_serve.py')}. JSON per run in "
        f"[{results_dir.name}/]({results_dir.name}/).",
        "",
    ]
    for workload in workloads:
        base = next((d["output_throughput"] for label, _, d in rows[workload.name] if label == "auto"), None)
        lines += [
            f"**{workload.name}** ({args.num_prompts or workload.prompts} prompts, "
            f"{workload.kv_bytes // MIB} MiB of KV; "
            f"`{' '.join(workload.args)}`)",
            "",
            "| kv-cache-dtype | KV tokens | output tok/s | vs auto | mean TTFT (ms) | mean TPOT (ms) |",
            "|---|---|---|---|---|---|",
        ]
        for label, tokens, d in rows[workload.name]:
            ratio = f"{d['output_throughput'] / base:.2f}x" if base else "-"
            capacity_tokens = f"{tokens:,}" if tokens else "?"
            lines.append(f"| {label} | {capacity_tokens} | {d['output_throughput']:.1f} | {ratio} | "
                         f"{d['mean_ttft_ms']:.0f} | {d['mean_tpot_ms']:.1f} |")
        lines.append("")
    args.out.write_text("```bash\npython scripts/bench_vllm_serve.py --out " + str(args.out) + "\n```\n\n"
                        + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
