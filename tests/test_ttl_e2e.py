"""Prefix-cache TTL end to end: real ``vllm serve`` processes and a real engine.

* ``vllm serve`` (nf4 KV cache, TTL 2 s from ``--additional-config``, and
  ``NF4KV_PREFIX_CACHE_TTL_S=1000`` that the CLI must override): the same
  prompt twice within the TTL counts prefix hits on ``/metrics``; after the TTL
  it is a miss, the expired-block counter rises, and ``vllm-nf4kv stats`` shows it;
* ``vllm serve`` (auto, TTL off): the same prompt after longer than 2 s still hits;
* ``vllm serve`` with a negative TTL, or a misspelt ``nf4kv`` key, exits at
  startup with a clear message;
* an in-process engine (auto dtype, TTL from the environment variable).

The servers start together (startup is most of their time) and each test
stops its server when done. Block size 32 and ~100-token prompts keep a request
well under the TTL on CPU.

Timing on a loaded 2-core machine (docs/ttl.md): a hit is asserted only when
both requests of a pair finished within the TTL (that bounds the time from the
first release to the second lookup); otherwise the pair is retried with a new
prompt. A miss is asserted after waiting the TTL plus a 1 s margin from the
moment the blocks were last released, which only gets safer under load.
"""

from __future__ import annotations

import json
import time

import pytest
from serve_process import BLOCK_SIZE, STARTUP_TIMEOUT_S, Server, launch, prompt, server_env, stop, wait_ready

from vllm_nf4kv import cli
from vllm_nf4kv.ttl.config import ENV_VAR

pytestmark = pytest.mark.slow

TTL_S = 2.0
MARGIN_S = 1.0


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
        started["typo"] = launch(
            model_dir,
            logs / "typo.log",
            "--additional-config",
            json.dumps({"nf4kv": {"prefix_cache_ttl": 5}}),
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
        started["off"] = launch(model_dir, logs / "off.log", "--kv-cache-dtype", "auto", env=server_env())
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


def test_serve_refuses_a_misspelt_key(servers):
    """A typo must not start a server with the TTL silently off."""
    server = servers["typo"]
    returncode = server.process.wait(timeout=STARTUP_TIMEOUT_S)
    output = server.log.read_text(errors="replace")
    assert returncode != 0
    expected = "'prefix_cache_ttl' is not a vllm-nf4kv setting; did you mean 'prefix_cache_ttl_s'?"
    assert expected in output, output[-3000:]


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


def test_serve_auto_ttl_off_keeps_lru(servers):
    server = wait_ready(servers["off"])
    text = prompt("off")
    before = server.stats()
    tokens = server.complete(text)
    time.sleep(TTL_S + MARGIN_S)
    server.complete(text)
    after = server.stats_after(before.queries, 2 * tokens)
    assert after.hits - before.hits >= 2 * BLOCK_SIZE, "without a TTL the prompt must still hit"
    # no TTL, not nf4: vLLM's own pool and stats path, so no nf4kv metrics at all
    assert after.expired_blocks is None and after.cached_blocks is None and after.ttl_s is None
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
