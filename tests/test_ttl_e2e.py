"""Prefix-cache TTL end to end: real ``vllm serve`` processes and a real engine.

* ``vllm serve`` (nf4 KV cache, TTL 2 s from ``--additional-config``, and
  ``NF4KV_PREFIX_CACHE_TTL_S=1000`` that the CLI must override): the same
  prompt again within the TTL of its last use counts prefix hits on
  ``/metrics``; after the TTL it is a miss, the expired-block counter rises, and
  ``vllm-nf4kv stats`` shows it;
* ``vllm serve`` (auto, TTL off): the same prompt a day later still hits;
* ``vllm serve`` with a negative TTL, or a misspelt ``nf4kv`` key, exits at
  startup with a clear message;
* an in-process engine (TTL from the environment variable), on the real clock
  (expiry after real sleeping) and on a controlled one (hits within the TTL).

The servers' TTL pools run on a :class:`serve_process.ControlledClock` (a
test-only ``sitecustomize``, no product setting): time stands still for the TTL
until the test advances it, so no assertion depends on how loaded the machine
is, and no test waits for the TTL. The servers start together (startup is most
of their time) and each test stops its server when done.
"""

from __future__ import annotations

import json
import time

import pytest
from serve_process import (
    BLOCK_SIZE,
    STARTUP_TIMEOUT_S,
    ControlledClock,
    Server,
    launch,
    prompt,
    server_env,
    stop,
    wait_ready,
)

from vllm_nf4kv import cli
from vllm_nf4kv.format import KV_CACHE_DTYPE, format_for
from vllm_nf4kv.ttl.config import ENV_VAR

pytestmark = pytest.mark.slow

TTL_S = 2.0
FULL_BLOCKS = 3  # a prompt() fills three blocks and part of a fourth
REAL_CLOCK_MARGIN_S = 0.1  # only the real-clock test sleeps: past the TTL, whatever the load


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
            clock=ControlledClock(logs / "ttl.clock"),
        )
        started["off"] = launch(
            model_dir,
            logs / "off.log",
            "--kv-cache-dtype",
            "auto",
            env=server_env(),
            clock=ControlledClock(logs / "off.clock"),
        )
        yield started
    finally:
        for server in started.values():
            stop(server.process)


def prefix_hits(server: Server, text: str) -> int:
    """Send ``text`` once; the prefix-cache hits (tokens) it added on ``/metrics``."""
    before = server.stats()
    tokens = server.complete(text)
    return int(server.stats_after(before.queries, tokens).hits - before.hits)


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


def test_serve_nf4_ttl_expires_prefix_hits(servers, model_shape, capsys):
    server = wait_ready(servers["ttl"])
    clock = server.clock
    assert server.clock_installed(), f"the test clock did not reach the server:\n{server.log_tail()}"
    text = prompt("ttl")
    assert prefix_hits(server, text) == 0
    assert prefix_hits(server, text) >= FULL_BLOCKS * BLOCK_SIZE, "a second request within the TTL must hit"
    # The TTL runs from the last use: two steps of 0.9 TTL, each ending in a use, keep hitting.
    for _ in range(2):
        clock.advance(0.9 * TTL_S)
        assert prefix_hits(server, text) >= FULL_BLOCKS * BLOCK_SIZE, "unused for less than the TTL: a hit"
    expired_before = server.stats().expired_blocks
    assert expired_before is not None, f"no nf4kv metrics on /metrics:\n{server.log_tail()}"

    clock.advance(TTL_S + 0.1)
    before = server.stats()
    tokens = server.complete(text)
    after = server.stats_after(before.queries, tokens)
    assert after.hits == before.hits, "a prompt unused for longer than the TTL must miss"
    assert after.expired_blocks >= expired_before + FULL_BLOCKS
    assert after.cached_blocks >= FULL_BLOCKS and after.ttl_s == TTL_S
    # nf4 pages against bf16 ones for the same tokens: K and V, head_dim values, 2 bytes each
    cell = format_for(KV_CACHE_DTYPE, model_shape["head_dim"]).cell_bytes
    bf16_cell = 2 * model_shape["head_dim"] * 2
    assert after.kv_cache_bytes == pytest.approx(after.kv_cache_bf16_bytes * cell / bf16_cell, rel=1e-9)

    assert cli.main(["stats", "--url", server.url]) == 0
    view = capsys.readouterr().out
    for line in ("hit rate", "TTL            2 s", "expirations", "saved vs bf16", "dtype nf4"):
        assert line in view, view
    assert "KV fetch" not in server.log.read_text(errors="replace")  # the payload never leaks
    stop(server.process)  # free the CPU for the next test


def test_serve_auto_ttl_off_keeps_lru(servers):
    server = wait_ready(servers["off"])
    assert server.clock_installed(), f"the test clock did not reach the server:\n{server.log_tail()}"
    text = prompt("off")
    assert prefix_hits(server, text) == 0
    server.clock.advance(24 * 3600.0)  # no TTL: a day unused changes nothing
    assert prefix_hits(server, text) >= FULL_BLOCKS * BLOCK_SIZE, "without a TTL the prompt must still hit"
    after = server.stats()
    # no TTL, not nf4: vLLM's own pool and stats path, so no nf4kv metrics at all
    assert after.expired_blocks is None and after.cached_blocks is None and after.ttl_s is None
    stop(server.process)


def cached(llm, text: str, params) -> int:
    """Generate for ``text`` in-process; the prompt tokens that came from the prefix cache."""
    return llm.generate([text], params, use_tqdm=False)[0].num_cached_tokens


def test_engine_ttl_from_environment(model_dir, monkeypatch):
    """The TTL from the environment on an in-process engine: the real clock, then a controlled one."""
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
        state = pool._nf4kv
        assert isinstance(pool, TTLBlockPoolMixin) and state.ttl_s == TTL_S
        params = SamplingParams(max_tokens=1)
        # The real clock: sleeping past the TTL after the last release only gets safer under load.
        assert state.clock is time.monotonic
        text = prompt("engine-real-clock")
        assert cached(llm, text, params) == 0
        expired_before = state.expired_blocks
        time.sleep(TTL_S + REAL_CLOCK_MARGIN_S)
        assert cached(llm, text, params) == 0, "unused for longer than the TTL (real time): a miss"
        assert state.expired_blocks >= expired_before + FULL_BLOCKS

        # A controlled clock: hits within the TTL, however slow the requests
        clock = state.clock = ControlledClock(start=time.monotonic())  # never behind the releases so far
        text = prompt("engine-controlled-clock")
        assert cached(llm, text, params) == 0
        assert cached(llm, text, params) >= FULL_BLOCKS * BLOCK_SIZE
        clock.advance(0.9 * TTL_S)
        assert cached(llm, text, params) >= FULL_BLOCKS * BLOCK_SIZE
        expired_before = state.expired_blocks
        clock.advance(TTL_S + 0.1)
        assert cached(llm, text, params) == 0
        assert state.expired_blocks >= expired_before + FULL_BLOCKS
    finally:
        del llm
        gc.collect()
