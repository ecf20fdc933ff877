"""``vllm-nf4kv stats``: parsing ``/metrics`` and the statistics view.

Served here by a local HTTP server with the text a real ``vllm serve`` gave
(two engines, to check the sums), its KV-cache sizes those of the current nf4
format (:func:`vllm_nf4kv.format.format_for`); the end-to-end run against a
real server is in ``test_ttl_e2e.py``.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading

import pytest

from vllm_nf4kv import cli
from vllm_nf4kv.format import KV_CACHE_DTYPE, format_for
from vllm_nf4kv.tools.stats import collect, metrics_url, parse_metrics, render

HEAD_DIM = 64  # SmolLM2-135M, the model of the server the text comes from
# one engine's KV cache in bf16: 921,600 (token, layer, KV head) cells of 256 B; written below in
# exponent notation, as Prometheus clients may write it
BF16_BYTES = 235_929_600
NF4_BYTES = BF16_BYTES // (2 * HEAD_DIM * 2) * format_for(KV_CACHE_DTYPE, HEAD_DIM).cell_bytes

METRICS = f"""\
# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{{engine="0",model_name="smollm2"}} 720.0
vllm:prefix_cache_queries_total{{engine="1",model_name="smollm2"}} 280.0
vllm:prefix_cache_queries_created{{engine="0",model_name="smollm2"}} 1.79e+09
vllm:prefix_cache_hits_total{{engine="0",model_name="smollm2"}} 256.0
vllm:prefix_cache_hits_total{{engine="1",model_name="smollm2"}} 144.0
vllm:cache_config_info{{block_size="128",cache_dtype="nf4",note="a \\"quoted\\", value"}} 1.0
nf4kv:prefix_cache_expired_blocks_total{{cause="server_ttl",engine="0",model_name="smollm2"}} 2.0
nf4kv:prefix_cache_expired_blocks_total{{cause="request_ttl",engine="0",model_name="smollm2"}} 0.0
nf4kv:prefix_cache_expired_blocks_total{{cause="server_ttl",engine="1",model_name="smollm2"}} 0.0
nf4kv:prefix_cache_expired_blocks_total{{cause="request_ttl",engine="1",model_name="smollm2"}} 1.0
nf4kv:prefix_cache_cached_blocks{{engine="0",model_name="smollm2"}} 5.0
nf4kv:prefix_cache_cached_blocks{{engine="1",model_name="smollm2"}} 1.0
nf4kv:prefix_cache_ttl_seconds{{engine="0",model_name="smollm2"}} 600.0
nf4kv:prefix_cache_ttl_seconds{{engine="1",model_name="smollm2"}} 600.0
nf4kv:kv_cache_bytes{{engine="0",model_name="smollm2"}} {NF4_BYTES}
nf4kv:kv_cache_bytes{{engine="1",model_name="smollm2"}} {NF4_BYTES}
nf4kv:kv_cache_bf16_bytes{{engine="0",model_name="smollm2"}} {BF16_BYTES:.6e}
nf4kv:kv_cache_bf16_bytes{{engine="1",model_name="smollm2"}} {BF16_BYTES:.6e}
"""


def test_parse_metrics_labels_and_values():
    samples = list(parse_metrics(METRICS))
    assert ("vllm:prefix_cache_hits_total", {"engine": "1", "model_name": "smollm2"}, 144.0) in samples
    info = [labels for name, labels, _ in samples if name == "vllm:cache_config_info"]
    assert info == [{"block_size": "128", "cache_dtype": "nf4", "note": 'a \\"quoted\\", value'}]


def test_collect_sums_engines():
    stats = collect(METRICS)
    assert (stats.queries, stats.hits, stats.misses) == (1000, 400, 600)
    assert stats.hit_rate == pytest.approx(0.4)
    assert (stats.expired_blocks, stats.cached_blocks, stats.ttl_s) == (3, 6, 600)
    assert stats.expired_by_cause == {"server_ttl": 2, "request_ttl": 1}
    assert (stats.kv_cache_bytes, stats.kv_cache_bf16_bytes) == (2 * NF4_BYTES, 2 * BF16_BYTES)
    assert stats.kv_saved_bytes == 2 * (BF16_BYTES - NF4_BYTES)
    assert stats.cache_dtype == "nf4"


def test_render_view():
    text = render(collect(METRICS, "http://h/metrics"))
    saved = 2 * (BF16_BYTES - NF4_BYTES)  # in MiB, one decimal; the fraction of the bf16 bytes
    saved_line = f"saved vs bf16  {saved / 2**20:,.1f} MiB ({100 * saved / (2 * BF16_BYTES):.1f}%)"
    for line in (
        "hits           400 tokens",
        "misses         600 tokens",
        "hit rate       40.0%",
        "TTL            600 s",
        "expirations    3 blocks (server TTL 2, request TTLs 1)",
        "cached blocks  6",
        saved_line,
    ):
        assert line in text, text


def test_ttl_off_and_missing_plugin():
    off = METRICS.replace("} 600.0", "} +Inf")
    assert "TTL            off" in render(collect(off))
    plain = "\n".join(line for line in METRICS.splitlines() if not line.startswith("nf4kv:"))
    text = render(collect(plain))
    assert "no TTL and no nf4 cache, or no vllm-nf4kv plugin" in text and "hit rate       40.0%" in text
    policy_only = ("nf4kv:prefix_cache_expired", "nf4kv:prefix_cache_cached")
    nf4_no_ttl = "\n".join(line for line in off.splitlines() if not line.startswith(policy_only))
    text = render(collect(nf4_no_ttl))
    assert "TTL            off" in text and "expirations    none (no TTL)" in text and "saved vs bf16" in text


def test_metrics_url():
    assert metrics_url("127.0.0.1:8000") == "http://127.0.0.1:8000/metrics"
    assert metrics_url("http://h:1/") == "http://h:1/metrics"
    assert metrics_url("http://h:1/metrics") == "http://h:1/metrics"


@pytest.fixture
def metrics_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = METRICS.encode()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_cli_prints_the_view(metrics_server, capsys):
    assert cli.main(["stats", "--url", metrics_server]) == 0
    assert "hit rate       40.0%" in capsys.readouterr().out
    assert cli.main(["stats", "--url", metrics_server, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["hits"] == 400 and data["expired_blocks"] == 3 and data["ttl_s"] == 600


def test_cli_unreachable_server(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    assert cli.main(["stats", "--url", f"127.0.0.1:{port}", "--timeout", "2"]) == 1
    assert "cannot read" in capsys.readouterr().err
