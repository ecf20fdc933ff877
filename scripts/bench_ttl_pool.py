"""Cost of the prefix-cache TTL policy per block-pool operation, on vLLM's real ``BlockPool``.

Replays one fixed workload (prompts drawn from a few shared prefixes, prefix
lookups, touches of the hits, new blocks, caching, releases; the injected clock
advances so that blocks expire all the time) on vLLM's own pool and on the
pool with the policy, side by side, and prints microseconds per request and
per block-pool call for each. Variants:

* ``vllm``: vLLM's ``BlockPool`` untouched;
* ``counted``: what every engine gets with no TTL (a cached-block count);
* ``server``: a server-wide TTL;
* ``request-K``: no server-wide TTL, each request with one of K distinct request TTLs.

``--against REV`` adds ``REV:counted`` and ``REV:server``: the same replay with
``vllm_nf4kv/ttl/pool.py`` as it was at git revision REV (before request TTLs,
e.g.). The variants run interleaved, ``--repeats`` times each; the table shows
each one's median and its ratio to ``vllm`` from the same run::

    python scripts/bench_ttl_pool.py --against aa65a25 --out docs/results/ttl-pool-ops.md
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]

BLOCK_SIZE = 16


def make_parts():
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK_SIZE, sha256)

    def request(request_id: str, tokens: list[int]) -> Request:
        return Request(request_id, tokens, SamplingParams(max_tokens=1), None, block_hasher=hasher)

    return BlockPool, request


def workload(num_requests: int, seed: int) -> list[list[int]]:
    """Prompts: one of 32 shared prefixes (1-8 blocks) plus a private tail (1-4 blocks)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(50_000) for _ in range(BLOCK_SIZE * rng.randint(1, 8))] for _ in range(32)]
    return [
        rng.choice(prefixes) + [rng.randrange(50_000) for _ in range(BLOCK_SIZE * rng.randint(1, 4))]
        for _ in range(num_requests)
    ]


def pool_module_at(rev: str) -> ModuleType:
    """``vllm_nf4kv/ttl/pool.py`` as it was at git revision ``rev``, as a module of its own."""
    command = ["git", "-C", str(REPO), "show", f"{rev}:vllm_nf4kv/ttl/pool.py"]
    source = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"pool_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"pool_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run(variant: str, prompts: list[list[int]], requests: list, num_blocks: int, old: ModuleType | None):
    """Seconds for the whole replay, and the block-pool calls it made."""
    from vllm_nf4kv.ttl import pool as current

    module = current
    if ":" in variant:
        module, variant = old, variant.split(":")[1]
    enable_ttl = module.enable_ttl
    request_ttl_scope = getattr(module, "request_ttl_scope", lambda pool, ttl: contextlib.nullcontext())
    block_pool_cls, _ = make_parts()
    pool = block_pool_cls(num_gpu_blocks=num_blocks, enable_caching=True, hash_block_size=BLOCK_SIZE)
    now = [0.0]
    ttls = [None]
    if variant == "counted":
        enable_ttl(pool, None, clock=lambda: now[0])
    elif variant == "server":
        enable_ttl(pool, 2.0, clock=lambda: now[0])
    elif variant.startswith("request-"):
        count = int(variant.split("-")[1])
        enable_ttl(pool, None, request_ttls=True, clock=lambda: now[0])
        ttls = [0.5 + 3.0 * i / count for i in range(count)]
    running: list[list] = []
    calls = 0
    start = time.perf_counter()
    for index, request in enumerate(requests):
        now[0] += 0.01
        hits = []
        for block_hash in request.block_hashes:
            calls += 1
            found = pool.get_cached_block(block_hash, [0])
            if found is None:
                break
            hits.append(found[0])
        needed = -(-len(prompts[index]) // BLOCK_SIZE) - len(hits)
        while running and pool.get_num_free_blocks() < needed + len(hits):
            pool.free_blocks(reversed(running.pop(0)))
            calls += 1
        with request_ttl_scope(pool, ttls[index % len(ttls)]):
            pool.touch(hits)
            blocks = hits + pool.get_new_blocks(needed)
        pool.cache_full_blocks(request, blocks, len(hits), len(request.block_hashes), BLOCK_SIZE, 0)
        calls += 3
        running.append(blocks)
        if len(running) > 8:  # a few requests run at once
            pool.free_blocks(reversed(running.pop(0)))
            calls += 1
    return time.perf_counter() - start, calls


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--blocks", type=int, default=2_000, help="blocks in the pool")
    parser.add_argument("--repeats", type=int, default=5)
    variants = ["vllm", "counted", "server", "request-1", "request-4", "request-1000"]
    parser.add_argument("--variants", nargs="+", default=variants)
    parser.add_argument("--against", metavar="REV", help="also time pool.py of this git revision")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    old = pool_module_at(args.against) if args.against else None
    if old is not None:
        args.variants += [f"{args.against}:counted", f"{args.against}:server"]

    _, make_request = make_parts()
    prompts = workload(args.requests, seed=0)
    requests = [make_request(f"r{i}", tokens) for i, tokens in enumerate(prompts)]
    times: dict[str, list[float]] = {variant: [] for variant in args.variants}
    calls: dict[str, int] = {}
    for _ in range(args.repeats):
        for variant in args.variants:  # interleaved: machine noise hits every variant alike
            seconds, calls[variant] = run(variant, prompts, requests, args.blocks, old)
            times[variant].append(seconds)
    base = statistics.median(times[args.variants[0]])
    lines = [
        f"{args.requests:,} requests over 32 shared prefixes, {args.blocks:,}-block pool, block size "
        f"{BLOCK_SIZE}, clock +10 ms a request; median of {args.repeats} interleaved runs.",
        "",
        f"| variant | µs / request | µs / pool call | vs {args.variants[0]} |",
        "|---|---|---|---|",
    ]
    for variant in args.variants:
        median = statistics.median(times[variant])
        lines.append(
            f"| {variant} | {1e6 * median / args.requests:.1f} | {1e6 * median / calls[variant]:.2f} "
            f"| {median / base:.2f}x |"
        )
    options = f"--requests {args.requests} --blocks {args.blocks} --repeats {args.repeats}"
    if args.against:
        options += f" --against {args.against}"
    lines += ["", f"Command: `python scripts/bench_ttl_pool.py {options}`"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
