"""Prefix-cache TTL end to end: real ``vllm serve`` processes and a real engine.

* ``vllm serve`` (nf4 KV cache, TTL 2 s from ``--additional-config``, and
  ``NF4KV_PREFIX_CACHE_TTL_S=1000`` that the CLI must override): the same
  prompt twice within the TTL counts prefix hits on ``/metrics``; after the TTL
  it is a miss, the expired-block counter rises, and ``vllm-nf4kv stats`` shows it;
* ``vllm serve`` (fp8, TTL off): the same prompt after longer than 2 s still hits;
* ``vllm serve`` with a negative TTL exits at startup with a clear message;
* an in-process engine (auto dtype, TTL from the environment variable).

The three servers start together (startup is most of their time) and each test
stops its server when done. Block size 32 and ~100-token prompts keep a request
well under the TTL on CPU.

Timing on a loaded 2-core machine (docs/ttl.md): a hit is asserted only when
both requests of a pair finished within the TTL (that bounds the time from the
first release to the second lookup); otherwise the pair is retried with a new
prompt. A miss is asserted after waiting the TTL plus a 1 s margin from the
moment the blocks were last released, which only gets safer under load.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from vllm_nf4kv import cli
from vllm_nf4kv.tools.stats import collect, fetch
from vllm_nf4kv.ttl.config import ENV_VAR

pytestmark = pytest.mark.slow

TTL_S = 2.0
MARGIN_S = 1.0
MODEL_NAME = "smollm2"
KV_BYTES = 256 * 2**20
BLOCK_SIZE = 32  # small blocks and prompts keep each request well under the TTL on CPU
STARTUP_TIMEOUT_S = 240
TEXT = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money "
    "in my purse, and nothing particular to interest me on shore, I thought I would sail about "
    "a little and see the watery part of the world. "
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prompt(tag: str) -> str:
    return f"[{tag}] " + TEXT * 2  # about 100 tokens: three full 32-token blocks and a partial one


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log: Path) -> None:
        self.url, self.process, self.log = url, process, log

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def complete(self, text: str) -> int:
        """One completion (one generated token); returns its prompt token count."""
        body = json.dumps({"model": MODEL_NAME, "prompt": text, "max_tokens": 1, "temperature": 0})
        request = urllib.request.Request(
            f"{self.url}/v1/completions", body.encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)["usage"]["prompt_tokens"]

    def stats(self):
        return collect(fetch(f"{self.url}/metrics", 30), self.url)

    def stats_after(self, queries_before: float, prompt_tokens: int):
        """Stats once the front end has recorded ``prompt_tokens`` more queried tokens."""
        deadline = time.monotonic() + 15
        while True:
            stats = self.stats()
            if stats.queries >= queries_before + prompt_tokens or time.monotonic() > deadline:
                return stats
            time.sleep(0.1)


def server_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # a plain `vllm serve`: engine core in its own process
    env.pop(ENV_VAR, None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def vllm_command(model_dir: Path, port: int, *extra: str) -> list[str]:
    return [
        str(Path(sys.executable).with_name("vllm")),
        "serve",
        str(model_dir),
        "--served-model-name",
        MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        str(KV_BYTES),
        "--max-model-len",
        "2048",
        "--block-size",
        str(BLOCK_SIZE),
        *extra,
    ]


def stop(process: subprocess.Popen) -> None:
    """End the server and its engine core (they share the process group we gave it)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left
    process.wait(timeout=30)


def launch(model_dir: Path, log: Path, *extra: str, env: dict[str, str]) -> Server:
    port = free_port()
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            vllm_command(model_dir, port, *extra),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return Server(f"http://127.0.0.1:{port}", process, log)


def wait_ready(server: Server) -> Server:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"vllm serve exited ({server.process.returncode}) at startup:\n{server.log_tail()}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        if time.monotonic() > deadline:
            pytest.fail(f"vllm serve not ready after {STARTUP_TIMEOUT_S} s:\n{server.log_tail()}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    """Every server of this module, started at once: startup is most of their time."""
    logs = tmp_path_factory.mktemp("vllm-serve-logs")
    started: dict[str, Server] = {}
    try:
        started["bad"] = launch(
            model_dir,
            logs / "bad.log",
            "--additional-config",
            json.dumps({"nf4kv": {"prefix_cache_ttl_s": -5}}),
            env=server_env(),
        )
        started["ttl"] = launch(
            model_dir,
            logs / "ttl.log",
            "--kv-cache-dtype",
            "nf4",
            "--additional-config",
            json.dumps({"nf4kv": {"prefix_cache_ttl_s": TTL_S}}),
            env=server_env(**{ENV_VAR: "1000"}),  # the CLI value must win
        )
        started["off"] = launch(model_dir, logs / "off.log", "--kv-cache-dtype", "fp8", env=server_env())
        yield started
    finally:
        for server in started.values():
            stop(server.process)


def hits_of_a_fast_pair(server: Server, tag: str) -> tuple[str, int, float]:
    """Send a new prompt twice; retry until both finish within the TTL.

    Returns the prompt, the prefix-cache hits (tokens) the pair added, and the
    monotonic time after the second response (the blocks' last release is before it).
    """
    for attempt in range(4):
        text = prompt(f"{tag}-{attempt}")
        before = server.stats()
        start = time.monotonic()
        tokens = server.complete(text)
        server.complete(text)
        end = time.monotonic()
        after = server.stats_after(before.queries, 2 * tokens)
        if end - start < TTL_S:
            return text, int(after.hits - before.hits), end
    pytest.skip("machine too loaded: no pair of requests finished within the 2 s TTL")


def test_serve_refuses_negative_ttl(servers):
    server = servers["bad"]
    returncode = server.process.wait(timeout=STARTUP_TIMEOUT_S)
    output = server.log.read_text(errors="replace")
    assert returncode != 0
    assert "nf4kv.prefix_cache_ttl_s: prefix-cache TTL must be >= 0 seconds, got -5" in output, output[-3000:]


def test_serve_nf4_ttl_expires_prefix_hits(servers, capsys):
    server = wait_ready(servers["ttl"])
    text, hits, released_before = hits_of_a_fast_pair(server, "ttl")
    assert hits >= 2 * BLOCK_SIZE, f"the second request within the TTL must hit (hits {hits})"
    expired_before = server.stats().expired_blocks
    assert expired_before is not None, f"no nf4kv metrics on /metrics:\n{server.log_tail()}"

    time.sleep(max(0.0, released_before + TTL_S + MARGIN_S - time.monotonic()))
    before = server.stats()
    tokens = server.complete(text)
    after = server.stats_after(before.queries, tokens)
    assert after.hits == before.hits, "a prompt unused for longer than the TTL must miss"
    assert after.expired_blocks >= expired_before + 2  # its full blocks
    assert after.cached_blocks >= 2 and after.ttl_s == TTL_S
    assert after.kv_saved_bytes > 0.6 * after.kv_cache_bf16_bytes  # nf4 pages vs bf16

    assert cli.main(["stats", "--url", server.url]) == 0
    view = capsys.readouterr().out
    for line in ("hit rate", "TTL            2 s", "expirations", "saved vs bf16", "dtype nf4"):
        assert line in view, view
    assert "KV fetch" not in server.log.read_text(errors="replace")  # the payload never leaks
    stop(server.process)  # free the CPU for the next test


def test_serve_fp8_ttl_off_keeps_lru(servers):
    server = wait_ready(servers["off"])
    text = prompt("off")
    before = server.stats()
    tokens = server.complete(text)
    time.sleep(TTL_S + MARGIN_S)
    server.complete(text)
    after = server.stats_after(before.queries, 2 * tokens)
    assert after.hits - before.hits >= 2 * BLOCK_SIZE, "without a TTL the prompt must still hit"
    assert after.expired_blocks == 0 and after.ttl_s is None
    stop(server.process)


def test_engine_ttl_from_environment(model_dir, monkeypatch):
    import gc

    from vllm import LLM, SamplingParams

    from vllm_nf4kv.ttl.pool import TTLBlockPoolMixin

    monkeypatch.setenv(ENV_VAR, str(TTL_S))
    llm = LLM(
        model=str(model_dir),
        enforce_eager=True,
        kv_cache_memory_bytes=64 * 2**20,
        max_model_len=2048,
        block_size=BLOCK_SIZE,
    )
    try:
        pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
        assert isinstance(pool, TTLBlockPoolMixin) and pool._nf4kv.ttl_s == TTL_S
        params = SamplingParams(max_tokens=1)
        for attempt in range(4):
            text = prompt(f"engine-{attempt}")
            start = time.monotonic()
            first = llm.generate([text], params, use_tqdm=False)[0]
            second = llm.generate([text], params, use_tqdm=False)[0]
            end = time.monotonic()
            if end - start < TTL_S:
                break
        else:
            pytest.skip("machine too loaded: no pair of requests finished within the 2 s TTL")
        assert first.num_cached_tokens == 0 and second.num_cached_tokens >= 2 * BLOCK_SIZE
        time.sleep(max(0.0, end + TTL_S + MARGIN_S - time.monotonic()))
        third = llm.generate([text], params, use_tqdm=False)[0]
        assert third.num_cached_tokens == 0
        assert pool._nf4kv.expired_blocks >= 2
    finally:
        del llm
        gc.collect()
