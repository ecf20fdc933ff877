"""Bounded serving benchmark of auto / fp8 / nf4 through `vllm serve` (OpenAI streaming API).

    .venv/bin/python scripts/bench_serve.py [--dtypes auto fp8 nf4] [--kv-memory-bytes 67108864]
        [--out docs/results/serve-cpu.md]
    .venv/bin/python scripts/bench_serve.py --base-url http://127.0.0.1:8000 --dtypes nf4   # running server

Per dtype it starts one server (same flags, same KV budget; unless --base-url), then runs two
fixed workloads, each a fixed number of requests spread over N concurrent workers (asyncio), and
stops by itself:

* kv-bound:     long unique prompts (--long-prompt-tokens), many users (--long-users)
* not kv-bound: short unique prompts (--short-prompt-tokens), few users (--short-users)

Every request streams exactly --output-tokens tokens (ignore_eos). Reported: the most sequences
running at once (``vllm:num_requests_running`` sampled from /metrics every 0.2 s, and its mean
while requests were waiting or running), output tokens/s over the workload's wall time, TTFT and
TPOT percentiles per request.

``--capacity-control`` adds one more server: auto given the KV bytes that hold as many tokens as
nf4's cache did, i.e. nf4's capacity at auto's kernel costs. Its ratio to auto is what the extra
capacity alone buys in that workload; a 4-bit format beats it only where its kernels are cheaper
than vLLM's bf16 ones.

``--workload prefix`` instead runs, per dtype, one server with prefix caching on and one with
``--no-enable-prefix-caching`` (KV budget --prefix-kv-memory-bytes): 50 requests cycling over 5
unique 1000-token prompts (5 workers), then an agent-style run, 5 sessions x 10 rounds where each
round's prompt is the previous prompt + its completion + a new 60-token chunk. Reported: prefix
cache hit rate (``vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`` deltas) and
wall time on vs off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vllm_nf4kv.tools.loopback_server import LoopbackServer, ServerFailed, serve_env
from vllm_nf4kv.tools.stats import fetch, metric_totals

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / ".assets/models/smollm2-135m"
TEXTS = [REPO / ".assets/texts/moby_dick.txt", REPO / ".assets/texts/sotu_2000_2021.txt"]
CAPACITY_CONTROL = "auto, nf4's KV tokens"  # the --capacity-control row (plot_serving.py reads it)


@dataclass
class Workload:
    name: str
    prompt_tokens: int
    users: int
    requests: int


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    output_tokens: int = 0
    errors: int = 0
    wall: float = 0.0
    running: list[float] = field(default_factory=list)
    waiting: list[float] = field(default_factory=list)


def make_prompts(tokenizer, n: int, tokens: int, seed: int) -> list[str]:
    """`n` distinct prompts of exactly `tokens` tokens, cut from the texts at spread offsets."""
    ids = []
    for path in TEXTS:
        ids += tokenizer(path.read_text()[:400_000])["input_ids"]
    step = max(1, (len(ids) - tokens) // (n + 1))
    return [
        tokenizer.decode(ids[(seed * 7919 + i * step) % (len(ids) - tokens) :][:tokens]) for i in range(n)
    ]


async def sample_metrics(base: str, result: Result, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            sums = metric_totals(await loop.run_in_executor(None, fetch, base + "/metrics", 5))
            result.running.append(sums.get("vllm:num_requests_running", 0.0))
            result.waiting.append(sums.get("vllm:num_requests_waiting", 0.0))
        except OSError:
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass


async def run_workload(
    base: str, model: str, prompts: list[str], work: Workload, output_tokens: int
) -> Result:
    from openai import AsyncOpenAI
    from tqdm import tqdm

    client = AsyncOpenAI(base_url=base + "/v1", api_key="EMPTY", timeout=600, max_retries=0)
    result = Result()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts[: work.requests]:
        queue.put_nowait(p)
    bar = tqdm(total=work.requests, desc=work.name, unit="req", file=sys.stderr)

    async def one(prompt: str) -> None:
        start = time.perf_counter()
        first = last = None
        n = 0
        try:
            stream = await client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=output_tokens,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True, "min_tokens": output_tokens},
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    last = time.perf_counter()
                    first = first or last
                if chunk.usage:
                    n = chunk.usage.completion_tokens
        except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
            result.errors += 1
            print(f"request failed: {exc!r}", file=sys.stderr)
            return
        result.output_tokens += n
        if first is not None:
            result.ttft.append(first - start)
            if n > 1:
                result.tpot.append((last - first) / (n - 1))

    async def worker() -> None:
        while not queue.empty():
            await one(queue.get_nowait())
            bar.update(1)

    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_metrics(base, result, stop))
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(work.users)))
    result.wall = time.perf_counter() - start
    stop.set()
    await sampler
    bar.close()
    await client.close()
    return result


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def start_server(
    dtype: str,
    kv_bytes: int,
    log: Path,
    extra: tuple[str, ...] = (),
    server_env: tuple[str, ...] = (),
    port: int = 0,
) -> LoopbackServer:
    """A ready `vllm serve` of MODEL with `dtype` (stop it, or use it in a `with`)."""
    flags = [
        "--served-model-name", "smollm2", "--kv-cache-dtype", dtype, "--enforce-eager",
        "--max-model-len", "2048", "--kv-cache-memory-bytes", str(kv_bytes), "--seed", "0", *extra,
    ]  # fmt: skip
    env = serve_env(**dict(item.split("=", 1) for item in server_env))
    server = LoopbackServer.serve(MODEL, log, *flags, env=env, port=port)
    try:
        return server.wait_ready(300)
    except ServerFailed as error:
        server.stop()
        raise SystemExit(f"bench_serve: {error}") from None


def auto_bytes_per_token(model: Path = MODEL) -> int:
    """KV bytes one token of `model` costs with --kv-cache-dtype auto (the planner's count)."""
    from vllm_nf4kv.tools.plan import ModelShape

    return ModelShape.from_config(json.loads((model / "config.json").read_text())).bytes_per_token("auto")


def capacity(log: Path) -> int | None:
    m = re.search(r"KV cache size: ([\d,]+) tokens", log.read_text()) if log.exists() else None
    return int(m.group(1).replace(",", "")) if m else None


async def prefix_workloads(base: str, tokenizer, args) -> dict[str, dict]:
    """`repeat`: R requests cycling over U unique long prompts (W workers); `agent`: S sessions
    x T rounds, each round's prompt = previous prompt + its output + a new text chunk."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base + "/v1", api_key="EMPTY", timeout=600, max_retries=0)

    def counters() -> tuple[float, float, float]:
        sums = metric_totals(fetch(base + "/metrics", 5))
        return (
            sums.get("vllm:prefix_cache_hits_total", 0.0),
            sums.get("vllm:prefix_cache_queries_total", 0.0),
            sums.get("nf4kv:prefix_cache_expired_blocks_total", 0.0),
        )

    async def complete(prompt: str) -> str:
        out = await client.completions.create(
            model="smollm2",
            prompt=prompt,
            max_tokens=args.prefix_output_tokens,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
        return out.choices[0].text

    results = {}
    uniq = make_prompts(tokenizer, args.prefix_unique, args.prefix_prompt_tokens, seed=5)
    chunks = make_prompts(tokenizer, args.agent_rounds * args.agent_sessions, 60, seed=9)

    async def repeat() -> None:
        queue = [uniq[i % len(uniq)] for i in range(args.prefix_requests)]

        async def worker() -> None:
            while queue:
                await complete(queue.pop(0))

        await asyncio.gather(*(worker() for _ in range(args.prefix_users)))

    async def agent() -> None:
        async def session(k: int) -> None:
            prompt = uniq[k % len(uniq)][: len(uniq[k % len(uniq)]) // 2]
            for t in range(args.agent_rounds):
                prompt += await complete(prompt)
                prompt += "\n\n" + chunks[k * args.agent_rounds + t]

        await asyncio.gather(*(session(k) for k in range(args.agent_sessions)))

    for name, fn, n in (
        ("repeat", repeat, args.prefix_requests),
        ("agent", agent, args.agent_rounds * args.agent_sessions),
    ):
        h0, q0, e0 = counters()
        start = time.perf_counter()
        await fn()
        wall = time.perf_counter() - start
        h1, q1, e1 = counters()
        results[name] = {
            "wall": wall,
            "requests": n,
            "expired": e1 - e0,
            "hit_rate": (h1 - h0) / (q1 - q0) if q1 > q0 else float("nan"),
        }
        print(f"  {name}: {wall:.1f} s, prefix hit rate {results[name]['hit_rate']:.1%}", file=sys.stderr)
    await client.close()
    return results


def run_prefix(args, tokenizer) -> str:
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    configs = {"on": (), "off": ("--no-enable-prefix-caching",)}
    if args.prefix_ttl_s is not None:
        ttl_config = {"nf4kv": {"prefix_cache_ttl_s": args.prefix_ttl_s}}
        configs["ttl"] = ("--additional-config", json.dumps(ttl_config))
    res = {}
    for dtype in args.dtypes:
        for config, extra in configs.items():
            log = logs / f"server_prefix_{dtype}_{config}.log"
            print(f"== {dtype}, prefix caching {config}", file=sys.stderr)
            with start_server(
                dtype, args.prefix_kv_memory_bytes, log, extra, args.server_env, args.port
            ) as server:
                res[dtype, config] = asyncio.run(prefix_workloads(server.url, tokenizer, args))
    ttl = args.prefix_ttl_s
    header = (
        "| workload | kv-cache-dtype | requests | prefix hit rate (on) | wall, caching on (s) "
        "| wall, caching off (s) | time saved | speedup |"
    )
    rule = "|---|---|---|---|---|---|---|---|"
    if ttl is not None:
        header += f" hit rate, TTL {ttl:g} s | wall, TTL {ttl:g} s (s) | blocks expired |"
        rule += "---|---|---|"
    lines = [header, rule]
    for name, label in (
        (
            "repeat",
            f"{args.prefix_requests} requests over {args.prefix_unique} "
            f"unique {args.prefix_prompt_tokens}-token prompts",
        ),
        ("agent", f"agent: {args.agent_rounds} rounds x {args.agent_sessions} sessions"),
    ):
        for dtype in args.dtypes:
            on, off = res[dtype, "on"][name], res[dtype, "off"][name]
            line = (
                f"| {label} | {dtype} | {on['requests']} | {on['hit_rate']:.1%} "
                f"| {on['wall']:.1f} | {off['wall']:.1f} | {1 - on['wall'] / off['wall']:.0%} "
                f"| {off['wall'] / on['wall']:.2f}x |"
            )
            if ttl is not None:
                short = res[dtype, "ttl"][name]
                line += f" {short['hit_rate']:.1%} | {short['wall']:.1f} | {short['expired']:.0f} |"
            lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["auto", "fp8", "nf4"])
    parser.add_argument("--base-url", help="use this running server instead of starting one")
    parser.add_argument("--port", type=int, default=0, help="of the servers it starts; 0: a free one")
    parser.add_argument("--kv-memory-bytes", type=int, default=64 * 2**20)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--long-prompt-tokens", type=int, default=1000)
    parser.add_argument("--long-users", type=int, default=16)
    parser.add_argument("--long-requests", type=int, default=32)
    parser.add_argument("--short-prompt-tokens", type=int, default=100)
    parser.add_argument("--short-users", type=int, default=2)
    parser.add_argument("--short-requests", type=int, default=8)
    parser.add_argument("--logs", default="/tmp/bench_serve_logs")
    parser.add_argument(
        "--workload",
        choices=["serve", "prefix"],
        default="serve",
        help="prefix: prefix-cache workloads, each dtype with caching on and off",
    )
    parser.add_argument("--prefix-kv-memory-bytes", type=int, default=256 * 2**20)
    parser.add_argument("--prefix-unique", type=int, default=5)
    parser.add_argument("--prefix-prompt-tokens", type=int, default=1000)
    parser.add_argument("--prefix-requests", type=int, default=50)
    parser.add_argument("--prefix-users", type=int, default=5)
    parser.add_argument("--prefix-output-tokens", type=int, default=16)
    parser.add_argument("--agent-rounds", type=int, default=10)
    parser.add_argument("--agent-sessions", type=int, default=5)
    parser.add_argument(
        "--prefix-ttl-s", type=float, help="also run each dtype with caching on and this prefix-cache TTL"
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set in every server's environment (repeatable), the same for each dtype",
    )
    parser.add_argument(
        "--capacity-control",
        action="store_true",
        help=f"after the dtypes (which must include nf4), run '{CAPACITY_CONTROL}': auto "
        "with the KV bytes that hold as many tokens as nf4's cache (nf4's capacity "
        "at auto's kernel costs)",
    )
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    if args.capacity_control and ("nf4" not in args.dtypes or args.base_url):
        parser.error("--capacity-control needs nf4 among --dtypes and starts its own servers (no --base-url)")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    if args.workload == "prefix":
        md = run_prefix(args, tokenizer)
        print(md)
        if args.out:
            Path(args.out).write_text(md + "\n")
        return
    works = [
        Workload("kv-bound", args.long_prompt_tokens, args.long_users, args.long_requests),
        Workload("not kv-bound", args.short_prompt_tokens, args.short_users, args.short_requests),
    ]
    prompts = {
        w.name: make_prompts(tokenizer, w.requests, w.prompt_tokens, seed=i) for i, w in enumerate(works)
    }
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    rows = []

    def measure(label: str, dtype: str, kv_bytes: int) -> None:
        log = logs / f"server_{label.replace(' ', '_')}.log"
        server = None
        if args.base_url:
            base = args.base_url.rstrip("/")
        else:
            print(f"== {label}: starting vllm serve", file=sys.stderr)
            server = start_server(dtype, kv_bytes, log, server_env=args.server_env, port=args.port)
            base = server.url
        try:
            # one short warm-up request, not measured
            asyncio.run(
                run_workload(base, "smollm2", prompts[works[1].name][:1], Workload("warm-up", 0, 1, 1), 4)
            )
            for w in works:
                r = asyncio.run(run_workload(base, "smollm2", prompts[w.name], w, args.output_tokens))
                busy = [x for x, y in zip(r.running, r.waiting, strict=True) if x + y > 0]
                rows.append(
                    {
                        "dtype": label,
                        "work": w,
                        "capacity": capacity(log),
                        "r": r,
                        "max_running": max(r.running, default=float("nan")),
                        "mean_running": statistics.mean(busy) if busy else float("nan"),
                    }
                )
                print(
                    f"{label} {w.name}: {r.output_tokens / r.wall:.1f} out tok/s, "
                    f"max running {rows[-1]['max_running']:.0f}, errors {r.errors}",
                    file=sys.stderr,
                )
        finally:
            if server is not None:
                server.stop()

    for dtype in args.dtypes:
        measure(dtype, dtype, args.kv_memory_bytes)
    if args.capacity_control:
        nf4_tokens = next(x["capacity"] for x in rows if x["dtype"] == "nf4")
        measure(CAPACITY_CONTROL, "auto", nf4_tokens * auto_bytes_per_token())

    lines = [
        "| workload | kv-cache-dtype | KV tokens | max running seqs | mean running seqs "
        "| output tok/s | vs auto | TTFT p50 / p90 (s) | TPOT p50 / p90 (ms) | requests | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in works:
        base_tps = next(
            (x["r"].output_tokens / x["r"].wall for x in rows if x["work"] is w and x["dtype"] == "auto"),
            None,
        )
        for x in (x for x in rows if x["work"] is w):
            r = x["r"]
            tps = r.output_tokens / r.wall
            cap = f"{x['capacity']:,}" if x["capacity"] else "?"
            rel = f"{tps / base_tps:.2f}x" if base_tps else ""
            lines.append(
                f"| {w.name} ({w.prompt_tokens} prompt tok, {w.users} users) | {x['dtype']} | {cap} "
                f"| {x['max_running']:.0f} | {x['mean_running']:.1f} | {tps:.1f} | {rel} "
                f"| {pct(r.ttft, 50):.2f} / {pct(r.ttft, 90):.2f} "
                f"| {pct(r.tpot, 50) * 1e3:.0f} / {pct(r.tpot, 90) * 1e3:.0f} "
                f"| {w.requests} | {r.errors} |"
            )
    md = "\n".join(lines)
    print(md)
    if args.out:
        Path(args.out).write_text(md + "\n")


if __name__ == "__main__":
    main()
