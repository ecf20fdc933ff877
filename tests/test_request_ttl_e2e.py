"""Request TTLs end to end: a real ``vllm serve`` (nf4, no server-wide TTL) over HTTP.

A request sets its own prefix-cache TTL in ``vllm_xargs``; the server allows at
most ``max_request_ttl_s`` (3600 s here). Hits are read per request from
``usage.prompt_tokens_details.cached_tokens`` (``--enable-prompt-tokens-details``).
The server's TTL pool runs on a :class:`serve_process.ControlledClock` (a
test-only ``sitecustomize``): time stands still for the TTLs until a test
advances it, so no assertion depends on how fast this machine is and none waits
for a TTL. A TTL-0 block is expired the moment its request releases it.
"""

from __future__ import annotations

import json
import time

import pytest
from serve_process import BLOCK_SIZE, ControlledClock, launch, prompt, server_env, stop, wait_ready

from vllm_nf4kv import cli

pytestmark = pytest.mark.slow

MAX_REQUEST_TTL_S = 3600


def ttl(value) -> dict:
    return {"vllm_xargs": {"nf4kv_prefix_ttl_s": value}}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("vllm-serve-logs")
    log = logs / "request-ttl.log"
    config = {"nf4kv": {"max_request_ttl_s": MAX_REQUEST_TTL_S}}
    started = launch(
        model_dir,
        log,
        "--kv-cache-dtype",
        "nf4",
        "--enable-prompt-tokens-details",
        "--additional-config",
        json.dumps(config),
        env=server_env(),
        clock=ControlledClock(logs / "request-ttl.clock"),
    )
    try:
        yield wait_ready(started)
    finally:
        stop(started.process)


def cached_tokens(answer: dict) -> int:
    return (answer["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def test_ttl_zero_is_never_a_hit_after_release(server):
    text = prompt("zero")
    assert cached_tokens(server.completion(text, **ttl(0))) == 0
    assert cached_tokens(server.completion(text)) == 0, "a TTL-0 prompt must not be a prefix hit"


def test_ttl_within_its_bound_is_a_hit(server):
    text = prompt("sixty")
    assert cached_tokens(server.completion(text, **ttl(60))) == 0
    assert cached_tokens(server.completion(text, **ttl("1m"))) >= 3 * BLOCK_SIZE
    assert cached_tokens(server.completion(text)) >= 3 * BLOCK_SIZE


def test_request_ttl_expires_after_its_ttl_and_the_tightest_wins(server):
    """A 60 s request TTL holds 60 s from the last use; a longer TTL or none never loosens it."""
    assert server.clock_installed(), f"the test clock did not reach the server:\n{server.log_tail()}"
    text = prompt("expiring")
    assert cached_tokens(server.completion(text, **ttl(60))) == 0
    server.clock.advance(59)
    assert cached_tokens(server.completion(text, **ttl(3600))) >= 3 * BLOCK_SIZE
    server.clock.advance(59)  # 118 s since the first use, 59 since the last: still within 60
    assert cached_tokens(server.completion(text)) >= 3 * BLOCK_SIZE
    server.clock.advance(61)
    assert cached_tokens(server.completion(text)) == 0, "unused for longer than its 60 s TTL: a miss"
    # its new blocks were written by a request without a TTL: they start with none
    server.clock.advance(24 * 3600.0)
    assert cached_tokens(server.completion(text)) >= 3 * BLOCK_SIZE


def test_shared_prefix_privacy_wins(server):
    """Two tenants, one prefix, no cache_salt: the one that asks for 0 ends the sharing."""
    text = prompt("shared")
    server.completion(text)  # tenant A caches it, no TTL
    assert cached_tokens(server.completion(text, **ttl(0))) >= 3 * BLOCK_SIZE  # B hits, asks for 0
    assert cached_tokens(server.completion(text)) == 0  # nobody hits it after B's release


def test_cache_salt_keeps_tenants_apart(server):
    text = prompt("salted")
    server.completion(text, cache_salt="tenant-a")
    assert cached_tokens(server.completion(text, cache_salt="tenant-b", **ttl(0))) == 0
    assert cached_tokens(server.completion(text, cache_salt="tenant-a")) >= 3 * BLOCK_SIZE
    assert cached_tokens(server.completion(text, cache_salt="tenant-b")) == 0


def test_chat_completions_take_the_same_setting(server):
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": prompt("chat")}],
        "max_tokens": 1,
        "temperature": 0,
    }
    status, _ = server.post("/v1/chat/completions", {**body, **ttl(0)})
    assert status == 200
    status, answer = server.post("/v1/chat/completions", body)
    assert status == 200 and cached_tokens(answer) == 0


def test_anthropic_messages_take_vllm_xargs_and_drop_cache_control(server):
    """``/v1/messages`` passes ``vllm_xargs`` on; vLLM's request model drops ``cache_control``."""
    cache_control = {"type": "ephemeral", "ttl": "5m"}
    system = [{"type": "text", "text": prompt("messages"), "cache_control": cache_control}]
    messages = [{"role": "user", "content": "Hi"}]
    body = {"model": "smollm2", "max_tokens": 1, "system": system, "messages": messages}

    def cache_read(extra: dict) -> int:
        status, answer = server.post("/v1/messages", {**body, **extra})
        assert status == 200, answer
        return answer["usage"].get("cache_read_input_tokens") or 0

    assert cache_read(ttl(0)) == 0
    assert cache_read({}) == 0  # the TTL-0 request's blocks are gone
    assert cache_read({}) >= 3 * BLOCK_SIZE  # cache_control alone sets no TTL: a plain prefix hit


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "must be seconds as a number >= 0"),
        ("nan", "must be seconds as a number >= 0"),
        ("soon", "must be seconds as a number >= 0"),
        ([60], "must be seconds as a number >= 0"),  # JSON true arrives as 1: vLLM coerces it
        (MAX_REQUEST_TTL_S + 1, "above this server's maximum of 3600 s"),
        ("2h", "above this server's maximum of 3600 s"),
    ],
)
def test_bad_request_ttl_is_http_400(server, value, message):
    body = {"model": "smollm2", "prompt": prompt("bad"), "max_tokens": 1, **ttl(value)}
    status, answer = server.post("/v1/completions", body)
    assert status == 400, answer
    assert message in json.dumps(answer), answer


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("nf4kv_prefix_tl_s", "did you mean 'nf4kv_prefix_ttl_s'?"), ("nf4kv_prefix_retain_s", "known: ")],
)
def test_unknown_request_key_is_http_400(server, key, suggestion):
    """vLLM passes vllm_xargs through unchecked: a typo would leave the TTL silently off."""
    body = {"model": "smollm2", "prompt": prompt("typo"), "max_tokens": 1, "vllm_xargs": {key: 0}}
    status, answer = server.post("/v1/completions", body)
    assert status == 400, answer
    text = json.dumps(answer)
    assert f"'{key}' is not a vllm-nf4kv request key" in text and suggestion in text, answer
    assert "nf4kv_prefix_ttl_s" in text


@pytest.mark.parametrize(("kv_cache_dtype", "server_ttl_s"), [("nf4", None), ("auto", 3600)])
def test_engine_request_ttls_any_dtype_with_or_without_a_server_ttl(model_dir, kv_cache_dtype, server_ttl_s):
    """In-process engines; with no server TTL, vLLM's classes stay in place until a request sets one."""
    import gc

    from vllm import LLM, SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    from vllm_nf4kv.ttl.pool import TTLBlockPoolMixin, vllm_pool_class

    llm = LLM(
        model=str(model_dir),
        kv_cache_dtype=kv_cache_dtype,
        enforce_eager=True,
        block_size=BLOCK_SIZE,
        kv_cache_memory_bytes=64 * 2**20,
        max_model_len=2048,
        additional_config={"nf4kv": {"prefix_cache_ttl_s": server_ttl_s}},
    )
    try:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        manager = scheduler.kv_cache_manager
        text = prompt(f"engine-{kv_cache_dtype}")
        plain = SamplingParams(max_tokens=1)
        llm.generate([text], plain, use_tqdm=False)
        assert llm.generate([text], plain, use_tqdm=False)[0].num_cached_tokens >= 3 * BLOCK_SIZE
        if server_ttl_s is None:
            assert type(manager) is KVCacheManager
            assert type(manager.block_pool) is BlockPool
        zero = SamplingParams(max_tokens=1, extra_args={"nf4kv_prefix_ttl_s": 0})
        assert llm.generate([text], zero, use_tqdm=False)[0].num_cached_tokens >= 3 * BLOCK_SIZE
        assert isinstance(manager, KVCacheManager) and type(manager) is not KVCacheManager
        assert isinstance(manager.block_pool, TTLBlockPoolMixin)
        assert vllm_pool_class(type(manager.block_pool)) is BlockPool
        assert llm.generate([text], plain, use_tqdm=False)[0].num_cached_tokens == 0
        state = manager.block_pool._nf4kv
        assert state.expired_by_request >= 3 and state.expired_by_server == 0
        with pytest.raises(VLLMValidationError, match="nf4kv_prefix_ttl_s must be seconds"):  # vLLM's own
            llm.generate([text], SamplingParams(max_tokens=1, extra_args={"nf4kv_prefix_ttl_s": -1}))
    finally:
        del llm
        gc.collect()


def test_metrics_and_stats_count_request_expirations(server, capsys):
    server.completion(prompt("metrics"), **ttl(0))
    server.completion(prompt("metrics-next"))  # a step after the release counts it
    deadline = time.monotonic() + 15  # the front end records a step's stats after its output
    while (stats := server.stats()).expired_by_cause.get("request_ttl", 0) < 3:
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
    assert stats.expired_by_cause["server_ttl"] == 0 and stats.ttl_s is None
    assert cli.main(["stats", "--url", server.url]) == 0
    view = capsys.readouterr().out
    assert "TTL            off" in view and "request TTLs" in view, view
    assert server.process.poll() is None, "the server must survive every request above"
    stop(server.process)
