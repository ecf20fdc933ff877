"""A bounded soak of ``vllm serve --kv-cache-dtype nf4`` with the prefix-cache TTL on.

    .venv/bin/python scripts/soak.py [--duration-s 300] [--clients 4] [--ttl-s 3]
        [--json FILE] [--markdown FILE]

Starts its own server on 127.0.0.1 (``--enable-prompt-tokens-details``, so every
answer says how many prompt tokens were prefix-cache hits), then N clients send
requests until the time is up: prompts made of one of a few shared prefixes
(each with its own first block, hot ones and cold ones) and a random suffix,
random output lengths (``ignore_eos``), some streams the client hangs up on,
some requests with their own TTL (``vllm_xargs.nf4kv_prefix_ttl_s``).

What it reports, and what makes it exit 1:

* **errors**: a request that failed (HTTP error, exception);
* **lost**: a completed answer without its tokens, or with fewer or more than
  asked for;
* **TTL violations**: a request that hit a prefix whose blocks had been idle,
  by the client's clock, for longer than their TTL plus ``--slack-s``. The
  client's clock can only make blocks look *more* idle than the server saw
  them (a release happens before its answer arrives; a lookup after the send),
  so the check never flags a correct server; the slack covers the server
  noticing a hung-up stream. A block's TTL is the tightest of the server's and
  of the requests that used its current content, which is reset by a request
  that missed; a request whose hit is unknown (an aborted stream) resets it to
  its own TTL, the largest it can be. ``checked`` says how many requests
  arrived after such an idle period (a run with none has tested nothing);
* **RSS growth** of the server's process group (API server, engine core,
  worker) in the second half of the run above ``--max-rss-growth-mib``: the
  report gives RSS after the warm-up, halfway and at the end, per process;
  allocator pools and caches fill early (vLLM's CPU worker grows the same with
  ``--kv-cache-dtype auto``, docs/reliability.md), a leak keeps growing;
* **/metrics inconsistent** at the end: requests still running or waiting, KV
  usage not back to 0, ``vllm:request_success_total{finished_reason="length"}``
  not the number of completed requests, fewer prefix hits or generated tokens on the server than
  the clients received, cached blocks above the pool, the TTL gauge not the
  configured TTL.

``--assume-ttl-s`` checks the requests against a TTL the server does not have
(start it with ``--ttl-s 0``): violations then show the check detects hits it
should not allow (the soak's own test does that).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_nf4kv.tools.loopback_server import LoopbackServer, ServerFailed, group_pids, serve_env
from vllm_nf4kv.tools.stats import parse_metrics

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / ".assets/models/smollm2-135m"
DEFAULT_TEXT = REPO / ".assets/texts/moby_dick.txt"
SERVED_NAME = "soak"
BLOCK_SIZE = 32
STARTUP_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 300
CHUNKS_BEFORE_ABORT = 2
WARM_UP_REQUESTS = 4


@dataclass
class Prefix:
    """What the clients know of one shared prefix's first block."""

    text: str
    in_flight: int = 0
    idle_since: float | None = None  # client time the last request using it ended
    ttl_bound: float | None = None  # tightest TTL of the requests that used its content


@dataclass
class Report:
    """What the soak counted; ``--json`` writes it as is, ``--markdown`` as a table."""

    command: str
    duration_s: float
    clients: int
    ttl_s: float | None
    requests: int = 0
    completed: int = 0
    aborted: int = 0
    with_request_ttl: int = 0
    errors: int = 0
    lost: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    hits: int = 0
    checked: int = 0  # requests that arrived after their prefix was idle past its TTL + slack
    violations: int = 0
    expired_blocks: float = 0.0
    preemptions: float = 0.0
    rss_start_mib: float = 0.0
    rss_half_mib: float = 0.0  # halfway through: growth after it is the leak signal
    rss_end_mib: float = 0.0
    rss_max_mib: float = 0.0
    rss_by_process: dict[str, list[float]] = field(default_factory=dict)  # start, halfway, end
    metrics_problems: list[str] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def record_rss(self, when: int, by_process: dict[str, float]) -> float:
        """Keep one RSS sample (0: start, 1: halfway, 2: end); returns the group's total."""
        for name, mib in by_process.items():
            self.rss_by_process.setdefault(name, [0.0, 0.0, 0.0])[when] = mib
        total = sum(by_process.values())
        setattr(self, ("rss_start_mib", "rss_half_mib", "rss_end_mib")[when], total)
        self.rss_max_mib = max(self.rss_max_mib, total)
        return total

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_end_mib - self.rss_start_mib

    def failures(self, max_rss_growth_mib: float) -> list[str]:
        found = [
            f"{name}: {value}"
            for name, value in (
                ("errors", self.errors),
                ("lost responses", self.lost),
                ("TTL violations", self.violations),
            )
            if value
        ]
        late_growth = self.rss_end_mib - (self.rss_half_mib or self.rss_start_mib)
        if late_growth > max_rss_growth_mib:
            found.append(
                f"RSS grew {late_growth:.0f} MiB in the second half (limit {max_rss_growth_mib:.0f})"
            )
        return found + self.metrics_problems


# -- the server ----------------------------------------------------------------------


def serve_args(args: argparse.Namespace) -> list[str]:
    """``vllm serve`` arguments after the model, host and port."""
    nf4kv: dict[str, float] = {}
    if args.ttl_s:
        nf4kv["prefix_cache_ttl_s"] = args.ttl_s
    flags = [
        "--served-model-name", SERVED_NAME,
        "--kv-cache-dtype", args.kv_cache_dtype, "--enforce-eager", "--block-size", str(BLOCK_SIZE),
        "--max-model-len", "2048", "--kv-cache-memory-bytes", str(args.kv_memory_bytes),
        "--enable-prompt-tokens-details", "--seed", "0",
    ]  # fmt: skip
    if nf4kv:
        flags += ["--additional-config", json.dumps({"nf4kv": nf4kv})]
    return flags + shlex.split(args.server_args)


def group_rss_mib(pgid: int) -> dict[str, float]:
    """Resident memory (MiB) of each process in the server's process group, by name."""
    found: dict[str, float] = {}
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            name = next(line.split(None, 1)[1] for line in status if line.startswith("Name:"))
            for line in status:
                if line.startswith("VmRSS:"):
                    key = name if name not in found else f"{name}:{pid}"
                    found[key] = int(line.split()[1]) / 1024
    return found


# -- the load ------------------------------------------------------------------------


def make_prefixes(text: str, count: int, rng: random.Random) -> list[Prefix]:
    """Shared prefixes of 3-12 blocks' worth of words, each starting its own way."""
    words = text.split()
    prefixes = []
    for index in range(count):
        start = rng.randrange(len(words) - 2_000)
        length = rng.randint(3, 12) * BLOCK_SIZE * 3 // 4  # ~0.75 words a token
        prefixes.append(Prefix(f"[soak prefix {index}] " + " ".join(words[start : start + length])))
    return prefixes


def tightest_ttl(*ttls: float | None) -> float | None:
    """The smallest of the TTLs that are set (None: no TTL)."""
    ttls = [ttl for ttl in ttls if ttl is not None]
    return min(ttls) if ttls else None


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, report: Report) -> None:
        from openai import AsyncOpenAI

        self.args, self.report = args, report
        self.client = AsyncOpenAI(
            base_url=f"{url}/v1", api_key="EMPTY", timeout=REQUEST_TIMEOUT_S, max_retries=0
        )
        self.rng = random.Random(args.seed)
        text = Path(args.text).read_text()
        self.words = text.split()
        self.prefixes = make_prefixes(text, args.prefixes, self.rng)
        # Zipf-like: the first prefixes come back within their TTL, the last ones after it.
        self.weights = [1 / (rank + 1) for rank in range(len(self.prefixes))]
        self.check_ttl = args.assume_ttl_s if args.assume_ttl_s is not None else args.ttl_s or None

    def suffix(self) -> str:
        start = self.rng.randrange(len(self.words) - 100)
        return " " + " ".join(self.words[start : start + self.rng.randint(1, 64)])

    async def warm_up(self) -> None:
        """Requests that share nothing with the load, so RSS is measured from a warm server."""
        for _ in range(WARM_UP_REQUESTS):
            await self.client.completions.create(
                model=SERVED_NAME, prompt="[warm-up]" + self.suffix() * 4, max_tokens=8,
                extra_body={"ignore_eos": True},
            )  # fmt: skip

    async def one(self, prefix: Prefix) -> None:
        report, rng, args = self.report, self.rng, self.args
        max_tokens = rng.randint(1, args.max_tokens)
        request_ttl = None
        extra: dict = {"ignore_eos": True}
        if rng.random() < args.request_ttl_share:
            request_ttl = round(rng.uniform(0.5, 2.0) * (args.ttl_s or 2.0), 1)
            extra["vllm_xargs"] = {"nf4kv_prefix_ttl_s": request_ttl}
            report.with_request_ttl += 1
        abort = rng.random() < args.abort_share
        ttl = tightest_ttl(self.check_ttl, request_ttl)

        sent = time.monotonic()
        idle = None if prefix.in_flight or prefix.idle_since is None else sent - prefix.idle_since
        bound_at_send = prefix.ttl_bound
        overdue = idle is not None and bound_at_send is not None and idle > bound_at_send + args.slack_s
        prefix.in_flight += 1
        report.requests += 1
        cached: int | None = None
        try:
            prompt = prefix.text + self.suffix()
            if abort:
                await self.stream_then_hang_up(prompt, max_tokens, extra)
                report.aborted += 1
            else:
                answer = await self.client.completions.create(
                    model=SERVED_NAME, prompt=prompt, max_tokens=max_tokens, temperature=1.0,
                    seed=rng.randrange(2**31), extra_body=extra,
                )  # fmt: skip
                cached = self.account(answer, max_tokens)
        except Exception as error:  # noqa: BLE001 - counted and reported, the soak goes on
            report.errors += 1
            if len(report.error_samples) < 5:
                report.error_samples.append(repr(error)[:300])
        finally:
            prefix.in_flight -= 1
            if not prefix.in_flight:
                prefix.idle_since = time.monotonic()
        if overdue:
            report.checked += 1
            if cached:
                report.violations += 1
                if len(report.error_samples) < 5:
                    report.error_samples.append(
                        f"TTL violation: {cached} cached tokens after {idle:.1f} s idle "
                        f"(TTL {bound_at_send} s + slack {args.slack_s} s)"
                    )
        # The TTL of the prefix's current content: a miss (or an unknown) starts it anew, a hit tightens it.
        prefix.ttl_bound = tightest_ttl(prefix.ttl_bound, ttl) if cached else ttl

    def account(self, answer, max_tokens: int) -> int:
        report = self.report
        usage = answer.usage
        text_ok = bool(answer.choices) and answer.choices[0].finish_reason == "length"
        if usage is None or not text_ok or usage.completion_tokens != max_tokens:
            report.lost += 1
            if len(report.error_samples) < 5:
                report.error_samples.append(f"lost: {answer!r}"[:300])
            return 0
        details = usage.prompt_tokens_details
        cached = (details.cached_tokens or 0) if details is not None else 0
        report.completed += 1
        report.prompt_tokens += usage.prompt_tokens
        report.completion_tokens += usage.completion_tokens
        report.cached_tokens += cached
        report.hits += cached > 0
        return cached

    async def stream_then_hang_up(self, prompt: str, max_tokens: int, extra: dict) -> None:
        stream = await self.client.completions.create(
            model=SERVED_NAME, prompt=prompt, max_tokens=max(max_tokens, 8), stream=True,
            extra_body=extra,
        )  # fmt: skip
        chunks = 0
        async for _ in stream:
            chunks += 1
            if chunks >= CHUNKS_BEFORE_ABORT:
                break
        await stream.close()

    async def client_loop(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            prefix = self.rng.choices(self.prefixes, self.weights)[0]
            await self.one(prefix)
            await asyncio.sleep(self.rng.expovariate(1 / self.args.think_s))

    async def run(self, pgid: int) -> None:
        await self.warm_up()
        self.report.record_rss(0, group_rss_mib(pgid))
        deadline = time.monotonic() + self.args.duration_s
        halfway = deadline - self.args.duration_s / 2

        async def sample_rss() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(2)
                rss = group_rss_mib(pgid)
                if not self.report.rss_half_mib and time.monotonic() >= halfway:
                    self.report.record_rss(1, rss)
                self.report.rss_max_mib = max(self.report.rss_max_mib, sum(rss.values()))

        sampler = asyncio.create_task(sample_rss())
        await asyncio.gather(*(self.client_loop(deadline) for _ in range(self.args.clients)))
        await sampler
        await self.client.close()


# -- /metrics at the end ----------------------------------------------------------------


def check_metrics(server: LoopbackServer, report: Report, ttl_s: float | None) -> None:
    """Settle, then compare the server's counters with what the clients saw."""

    def totals() -> dict[str, float]:
        sums: dict[str, float] = {}
        for name, labels, value in parse_metrics(server.metrics()):
            if name == "vllm:cache_config_info":
                name = f"{name}:{labels.get('num_gpu_blocks')}"
            elif name == "vllm:request_success_total":  # aborted streams have a reason of their own
                name = f"{name}:{labels.get('finished_reason')}"
            sums[name] = sums.get(name, 0.0) + value
        return sums

    deadline = time.monotonic() + 30
    while True:  # aborted streams and the last stats reach /metrics within a few steps
        sums = totals()
        busy = sums.get("vllm:num_requests_running", 0) + sums.get("vllm:num_requests_waiting", 0)
        if (not busy and not sums.get("vllm:kv_cache_usage_perc", 0)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    problems = report.metrics_problems
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        if sums.get(name, 0):
            problems.append(f"{name} is {sums[name]} after the load")
    success = sums.get("vllm:request_success_total:length", 0)  # every request stops at max_tokens
    if success != report.completed + WARM_UP_REQUESTS:
        problems.append(
            f'vllm:request_success_total{{finished_reason="length"}} {success:.0f} '
            f"!= {report.completed} + {WARM_UP_REQUESTS} warm-up"
        )
    if sums.get("vllm:prefix_cache_hits_total", 0) < report.cached_tokens:
        problems.append("vllm:prefix_cache_hits_total below the clients' cached tokens")
    if sums.get("vllm:generation_tokens_total", 0) < report.completion_tokens:
        problems.append("vllm:generation_tokens_total below the clients' completion tokens")
    blocks = [int(key.rsplit(":", 1)[1]) for key in sums if key.startswith("vllm:cache_config_info:")]
    cached_blocks = sums.get("nf4kv:prefix_cache_cached_blocks")
    if (cached_blocks is None and ttl_s) or (cached_blocks and blocks and cached_blocks > blocks[0]):
        problems.append(f"nf4kv:prefix_cache_cached_blocks {cached_blocks} (pool {blocks})")
    gauge = sums.get("nf4kv:prefix_cache_ttl_seconds")
    if gauge != (ttl_s if ttl_s else float("inf")) and (ttl_s or gauge is not None):
        problems.append(f"nf4kv:prefix_cache_ttl_seconds {gauge}, configured {ttl_s}")
    report.expired_blocks = sums.get("nf4kv:prefix_cache_expired_blocks_total", 0.0)
    report.preemptions = sums.get("vllm:num_preemptions_total", 0.0)


# -- output --------------------------------------------------------------------------------


def markdown(report: Report) -> str:
    rows = [
        ("requests sent (completed / client hung up)",
         f"{report.requests} ({report.completed} / {report.aborted})"),
        ("with their own TTL (`nf4kv_prefix_ttl_s`)", report.with_request_ttl),
        ("errors", report.errors),
        ("lost responses", report.lost),
        ("prompt / completion tokens", f"{report.prompt_tokens:,} / {report.completion_tokens:,}"),
        ("prefix-cache hits (requests, tokens)", f"{report.hits}, {report.cached_tokens:,}"),
        ("requests after an idle period > TTL + slack (checked)", report.checked),
        ("TTL violations", report.violations),
        ("blocks expired (`nf4kv:prefix_cache_expired_blocks_total`)", f"{report.expired_blocks:.0f}"),
        ("preemptions", f"{report.preemptions:.0f}"),
        ("server RSS after warm-up -> halfway -> end (max)",
         f"{report.rss_start_mib:.0f} -> {report.rss_half_mib:.0f} -> {report.rss_end_mib:.0f} MiB "
         f"({report.rss_max_mib:.0f}): {report.rss_growth_mib:+.0f} MiB, "
         f"{report.rss_end_mib - report.rss_half_mib:+.0f} in the second half"),
        ("/metrics at the end", "; ".join(report.metrics_problems) or "consistent"),
    ]  # fmt: skip
    rows += [
        (f"RSS of `{name}` (start -> halfway -> end)", " -> ".join(f"{mib:.0f}" for mib in samples) + " MiB")
        for name, samples in sorted(report.rss_by_process.items())
    ]
    lines = [f"`{report.command}`", "", "| measure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="where prompts come from")
    parser.add_argument("--duration-s", type=float, default=300)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--ttl-s", type=float, default=3.0, help="server TTL; 0: none")
    parser.add_argument("--assume-ttl-s", type=float, help="check against this TTL instead (self-test)")
    parser.add_argument("--slack-s", type=float, default=2.0)
    parser.add_argument("--prefixes", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--think-s", type=float, default=0.3, help="mean pause between a client's requests")
    parser.add_argument("--abort-share", type=float, default=0.1)
    parser.add_argument("--request-ttl-share", type=float, default=0.2)
    parser.add_argument("--kv-cache-dtype", default="nf4", help="auto: the same soak on vLLM's own cache")
    parser.add_argument("--kv-memory-bytes", type=int, default=32 * 2**20)
    parser.add_argument("--max-rss-growth-mib", type=float, default=256, help="in the second half")
    parser.add_argument("--server-args", default="", help="more `vllm serve` arguments")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", type=Path, default=Path("soak-server.log"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shown = ["scripts/soak.py", *(argv if argv is not None else sys.argv[1:])]
    report = Report(shlex.join(shown), args.duration_s, args.clients, args.ttl_s or None)
    with LoopbackServer.serve(args.model, args.log, *serve_args(args), env=serve_env()) as server:
        try:
            server.wait_ready(STARTUP_TIMEOUT_S)
        except ServerFailed as error:
            raise SystemExit(f"soak: {error}") from None
        asyncio.run(Soak(args, server.url, report).run(server.process.pid))
        report.record_rss(2, group_rss_mib(server.process.pid))
        check_metrics(server, report, args.ttl_s or None)
    text = markdown(report)
    print(text)
    if args.json:
        figures = {**asdict(report), "rss_growth_mib": report.rss_growth_mib}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    failures = report.failures(args.max_rss_growth_mib)
    for failure in failures:
        print(f"soak: {failure}", file=sys.stderr)
    for sample in report.error_samples:
        print(f"soak: e.g. {sample}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
