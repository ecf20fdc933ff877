"""``vllm-nf4kv stats``: parsing ``/metrics`` and the statistics view.

Served here by a local HTTP server with the text a real ``vllm serve`` gave
(two engines, to check the sums); the end-to-end run against a real server is
in ``test_ttl_e2e.py``.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading

import pytest

from vllm_nf4kv import cli
from vllm_nf4kv.tools.stats import collect, metrics_url, parse_metrics, render

METRICS = """\
# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="smollm2"} 720.0
vllm:prefix_cache_queries_total{engine="1",model_name="smollm2"} 280.0
vllm:prefix_cache_queries_created{engine="0",model_name="smollm2"} 1.79e+09
vllm:prefix_cache_hits_total{engine="0",model_name="smollm2"} 256.0
vllm:prefix_cache_hits_total{engine="1",model_name="smollm2"} 144.0
vllm:cache_config_info{block_size="128",cache_dtype="nf4",note="a \\"quoted\\", value"} 1.0
nf4kv:prefix_cache_expired_blocks_total{cause="server_ttl",engine="0",model_name="smollm2"} 2.0
nf4kv:prefix_cache_expired_blocks_total{cause="request_ttl",engine="0",model_name="smollm2"} 0.0
nf4kv:prefix_cache_expired_blocks_total{cause="server_ttl",engine="1",model_name="smollm2"} 0.0
nf4kv:prefix_cache_expired_blocks_total{cause="request_ttl",engine="1",model_name="smollm2"} 1.0
nf4kv:prefix_cache_cached_blocks{engine="0",model_name="smollm2"} 5.0
nf4kv:prefix_cache_cached_blocks{engine="1",model_name="smollm2"} 1.0
nf4kv:prefix_cache_ttl_seconds{engine="0",model_name="smollm2"} 600.0
nf4kv:prefix_cache_ttl_seconds{engine="1",model_name="smollm2"} 600.0
nf4kv:kv_cache_bytes{engine="0",model_name="smollm2"} 6.6355200e+07
nf4kv:kv_cache_bytes{engine="1",model_name="smollm2"} 6.6355200e+07
nf4kv:kv_cache_bf16_bytes{engine="0",model_name="smollm2"} 2.359296e+08
nf4kv:kv_cache_bf16_bytes{engine="1",model_name="smollm2"} 2.359296e+08
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
    assert stats.kv_saved_bytes == 2 * (235929600 - 66355200)
    assert stats.cache_dtype == "nf4"


def test_render_view():
    text = render(collect(METRICS, "http://h/metrics"))
    for line in (
        "hits           400 tokens",
        "misses         600 tokens",
        "hit rate       40.0%",
        "TTL            600 s",
        "expirations    3 blocks (server TTL 2, request TTLs 1)",
        "cached blocks  6",
        "saved vs bf16  323.4 MiB (71.9%)",
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
