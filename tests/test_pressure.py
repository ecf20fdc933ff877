"""Under KV pressure nothing is lost: a pool too small for the load serves what a roomy one serves.

Two real ``vllm serve --kv-cache-dtype nf4`` processes: a *tight* one whose pool
(``--num-gpu-blocks-override``) holds a few requests at a time, with the TTL
machinery on, and a *roomy* one (256 MiB). The same greedy requests go to both,
concurrently: four shared prefixes, prompt lengths whose last block holds 1
token, half a block and a full block (vllm#50749 corrupted first tokens when the
last block was at most half full), ``max_tokens`` long enough that running
requests must grow and vLLM must preempt (vllm#50702 corrupted outputs with
prefix caching on and the pool full), and streams aborted by the client after a
few chunks.

Every completed request's tokens and logprobs must equal the roomy server's,
preemption must actually have happened (``vllm:num_preemptions_total``), and
afterwards the pool is empty and ``/metrics`` adds up.
"""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_process import BLOCK_SIZE, MODEL_NAME, Server, launch, server_env, stop, wait_ready

pytestmark = pytest.mark.slow

TIGHT_BLOCKS = 24  # 768 tokens: about three of these requests at a time
MAX_TOKENS = 48
PREFIX_BLOCKS = 4  # a shared prefix of 128 tokens
LAST_BLOCK_FILL = (1, BLOCK_SIZE // 2, BLOCK_SIZE)  # tokens in each prompt's last block
ABORTED_STREAMS = 3
TIMEOUT_S = 600  # one request, under the whole load on one CPU thread
CHUNKS_BEFORE_ABORT = 3


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("pressure-logs")
    # fp32: see test_vllm_cpu_engine.EXACT_DTYPE (bf16 matmuls are not batch-invariant on every CPU)
    common = ("--kv-cache-dtype", "nf4", "--max-model-len", "512", "--dtype", "float32")
    started: dict[str, Server] = {}
    try:
        started["tight"] = launch(
            model_dir,
            logs / "tight.log",
            *common,
            "--num-gpu-blocks-override",
            str(TIGHT_BLOCKS),
            "--additional-config",
            json.dumps({"nf4kv": {"prefix_cache_ttl_s": 3600}}),
            env=server_env(),
        )
        started["roomy"] = launch(model_dir, logs / "roomy.log", *common, env=server_env())
        for server in started.values():
            wait_ready(server)
        yield started
    finally:
        for server in started.values():
            stop(server.process)


@pytest.fixture(scope="module")
def prompts(model_dir, moby_dick) -> list[list[int]]:
    """Token-id prompts: 4 prefixes x 3 last-block fills (12 requests)."""
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(model_dir)(moby_dick[:120_000])["input_ids"]
    prompts = []
    for prefix in range(4):
        start = prefix * 2_000
        shared = tokens[start : start + PREFIX_BLOCKS * BLOCK_SIZE]
        for index, fill in enumerate(LAST_BLOCK_FILL):
            length = (1 + index % 2) * BLOCK_SIZE + fill  # one or two more full blocks, then `fill`
            offset = start + 8_000 + 300 * index
            prompts.append(shared + tokens[offset : offset + length])
    return prompts


def _complete(server: Server, prompt: list[int]) -> dict:
    body = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 1,
    }
    request = urllib.request.Request(
        f"{server.url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        choice = json.load(response)["choices"][0]
    return {"text": choice["text"], "logprobs": choice["logprobs"]["token_logprobs"]}


def _abort_stream(server: Server, prompt: list[int]) -> int:
    """Start a stream and hang up after a few chunks; returns the chunks read."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True}
    body["ignore_eos"] = True
    request = urllib.request.Request(
        f"{server.url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    chunks = 0
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        while chunks < CHUNKS_BEFORE_ABORT:
            line = response.readline()
            if not line:
                break
            chunks += line.startswith(b"data: {")
    return chunks


def _load(server: Server, prompts: list[list[int]]) -> list[dict]:
    """All prompts at once, and the aborted streams among them."""
    with ThreadPoolExecutor(len(prompts) + ABORTED_STREAMS) as pool:
        aborted = [pool.submit(_abort_stream, server, prompts[i]) for i in range(ABORTED_STREAMS)]
        results = [pool.submit(_complete, server, prompt) for prompt in prompts]
        assert all(future.result() == CHUNKS_BEFORE_ABORT for future in aborted)
        return [future.result() for future in results]


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{key}="{expected}"' in head for key, expected in labels.items()):
            total, seen = total + float(value), True
    assert seen, f"{name} {labels} not on /metrics"
    return total


def _idle_metrics(server: Server) -> str:
    """``/metrics`` once the engine has reported no running or waiting request."""
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
            text = response.read().decode()
        busy = _metric(text, "vllm:num_requests_running") + _metric(text, "vllm:num_requests_waiting")
        if busy == 0 or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


@pytest.fixture(scope="module")
def outcome(servers, prompts):
    roomy = _load(servers["roomy"], prompts)
    tight = _load(servers["tight"], prompts)
    return roomy, tight


def test_prompts_end_at_and_around_block_boundaries(prompts):
    assert {len(prompt) % BLOCK_SIZE for prompt in prompts} == {1, BLOCK_SIZE // 2, 0}
    demand = sum(len(prompt) + MAX_TOKENS for prompt in prompts)
    assert demand > 3 * TIGHT_BLOCKS * BLOCK_SIZE  # the load needs over three pools


def test_tight_pool_serves_what_a_roomy_one_serves(outcome):
    roomy, tight = outcome
    assert [r["text"] for r in tight] == [r["text"] for r in roomy]
    for got, expected in zip(tight, roomy, strict=True):
        # Bit for bit when run alone (measured on AMD Zen 4 and Intel Sapphire Rapids); once in a
        # full suite on the loaded 2-core Intel machine one logprob differed by 1.5e-6
        # (-0.3509627 vs -0.3509612): vLLM's fp32 linear layers with AMX took another path for
        # another batch. The nf4 kernels' own exactness is asserted bit for bit elsewhere.
        assert got["logprobs"] == pytest.approx(expected["logprobs"], abs=1e-5, rel=0)


def test_preemption_happened_and_the_pool_empties(servers, outcome, prompts):
    text = _idle_metrics(servers["tight"])
    preemptions = _metric(text, "vllm:num_preemptions_total")
    hits = _metric(text, "vllm:prefix_cache_hits_total")
    print(f"pressure: {preemptions:.0f} preemptions, {hits:.0f} prefix-hit tokens")  # for docs/reliability.md
    assert preemptions > 0
    assert _metric(text, "vllm:num_requests_running") == 0 and _metric(text, "vllm:num_requests_waiting") == 0
    assert _metric(text, "vllm:kv_cache_usage_perc") == 0.0
    assert _metric(text, "vllm:request_success_total", finished_reason="length") == len(prompts)
    # aborted streams are not in vLLM's success counter; they generated at most MAX_TOKENS each
    generated = _metric(text, "vllm:generation_tokens_total")
    assert len(prompts) * MAX_TOKENS <= generated <= (len(prompts) + ABORTED_STREAMS) * MAX_TOKENS
    cached = _metric(text, "nf4kv:prefix_cache_cached_blocks")
    assert 0 < cached <= TIGHT_BLOCKS
    assert _metric(text, "nf4kv:prefix_cache_expired_blocks_total") == 0  # TTL 3600 s: nothing expires
    assert _metric(text, "vllm:prefix_cache_hits_total") > 0
