"""A real ``vllm serve --kv-cache-dtype nf4`` process, driven by the ``openai`` client.

One server for the module (about 25 s to start on 2 cores), on 127.0.0.1 and a
free port; it is stopped whatever the tests do.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

VLLM = Path(sys.executable).with_name("vllm")
SERVED = "smollm2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    command = [
        str(VLLM), "serve", str(model_dir), "--served-model-name", SERVED,
        "--host", "127.0.0.1", "--port", str(port), "--kv-cache-dtype", "nf4",
        "--enforce-eager", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(64 * 2**20),
        *extra,
    ]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def wait_ready(process: subprocess.Popen, port: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited {process.returncode}:\n{process.stdout.read()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError("vllm serve did not become ready")


def stop_server(process: subprocess.Popen) -> str:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.stdout.read() if process.stdout else ""


@pytest.fixture(scope="module")
def server(model_dir):
    port = free_port()
    process = start_server(model_dir, port)
    try:
        wait_ready(process, port)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120)


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
        model=SERVED, prompt=moby_dick[:1500], max_tokens=1, temperature=0,
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
    metrics = urllib.request.urlopen(f"{server}/metrics", timeout=10).read().decode()
    hits = sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
        if line.startswith("vllm:prefix_cache_hits_total")
    )
    assert hits >= 256


def test_metrics_endpoint_reports_nf4(server):
    metrics = urllib.request.urlopen(f"{server}/metrics", timeout=10).read().decode()
    info = [line for line in metrics.splitlines() if line.startswith("vllm:cache_config_info")]
    assert info and 'cache_dtype="nf4"' in info[0]
