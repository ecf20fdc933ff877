"""A real ``vllm serve --kv-cache-dtype nf4`` process, driven by the ``openai`` client.

One server for the module (about 25 s to start on 2 cores), on 127.0.0.1 and a
free port; it is stopped whatever the tests do. The last test stops it and checks
that no process of it (the engine core above all) survives.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_nf4kv.tools.loopback_server import LoopbackServer, running, serve_env
from vllm_nf4kv.tools.stats import metric_totals, parse_metrics

pytestmark = pytest.mark.slow

SERVED = "smollm2"


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The module's server, stopped with its whole process group whatever the tests do."""
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    with LoopbackServer.serve(
        model_dir, log, "--served-model-name", SERVED, "--kv-cache-dtype", "nf4", "--enforce-eager",
        "--max-model-len", "2048", "--kv-cache-memory-bytes", str(64 * 2**20), env=serve_env(),
    ) as server:  # fmt: skip
        yield server.wait_ready(240)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120)


def test_completion_with_logprobs(client):
    result = client.completions.create(
        model=SERVED, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=3
    )
    choice = result.choices[0]
    assert "Paris" in choice.text
    assert len(choice.logprobs.token_logprobs) == result.usage.completion_tokens
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)


def test_chat_completion(client):
    result = client.chat.completions.create(
        model=SERVED,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        max_tokens=16,
        temperature=0,
    )
    assert "Paris" in result.choices[0].message.content


def test_streaming_matches_non_streaming(client):
    kwargs = dict(model=SERVED, prompt="Once upon a time", max_tokens=24, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    stream = client.completions.create(stream=True, **kwargs)
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len(pieces) > 1
    assert "".join(pieces) == whole


def test_prompt_logprobs(client, moby_dick):
    result = client.completions.create(
        model=SERVED,
        prompt=moby_dick[:1500],
        max_tokens=1,
        temperature=0,
        extra_body={"prompt_logprobs": 0},
    )
    scored = [entry for entry in result.choices[0].prompt_logprobs[1:] if entry]
    assert len(scored) > 200
    logprobs = [next(iter(entry.values()))["logprob"] for entry in scored]
    mean_nll = -sum(logprobs) / len(logprobs)
    assert 1.0 < mean_nll < 6.0  # SmolLM2 reads Moby Dick at ~4 nats/token; garbage KV reads ~10


def test_prefix_cache_hit_is_identical_over_http(client, server, moby_dick):
    kwargs = dict(model=SERVED, prompt=moby_dick[10000:11500], max_tokens=8, temperature=0, logprobs=2)
    first = client.completions.create(**kwargs).choices[0]
    second = client.completions.create(**kwargs).choices[0]
    assert second.text == first.text
    assert second.logprobs.token_logprobs == first.logprobs.token_logprobs
    assert metric_totals(server.metrics()).get("vllm:prefix_cache_hits_total", 0) >= 256


def test_metrics_endpoint_reports_nf4(server):
    info = [labels for name, labels, _ in parse_metrics(server.metrics()) if name == "vllm:cache_config_info"]
    assert info and info[0]["cache_dtype"] == "nf4"


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        found.add(todo[-1])
        todo += children.get(todo.pop(), [])
    return found


def test_stop_leaves_no_process_of_the_server(server):
    """Runs last: stop() ends the API server and its engine core, nothing is orphaned."""
    processes = descendants(server.process.pid)
    assert len(processes) >= 2, "no engine core process: the check below would test nothing"
    escaped = [pid for pid in processes - set(server.pids()) if running(pid)]
    assert not escaped, "server processes outside its process group escape stop()"
    server.stop()
    assert not [pid for pid in processes if running(pid)], "processes of the server survived stop()"
    assert server.pids() == []
