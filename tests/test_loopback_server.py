"""``tools/loopback_server.py`` with stand-in servers (a few seconds, no vLLM).

The guarantee that matters: :meth:`LoopbackServer.stop` leaves no process of
the server behind, even one that ignores SIGTERM after its parent has exited,
as a stuck engine core would. ``tests/test_vllm_serve.py`` checks the same on a
real ``vllm serve``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import textwrap
import time

import pytest

from vllm_nf4kv.tools.loopback_server import LoopbackServer, ServerFailed, free_port, running
from vllm_nf4kv.tools.stats import metric_totals

# A parent that exits on SIGTERM, with a child that ignores it (and says so when it does).
PARENT_AND_STUBBORN_CHILD = textwrap.dedent("""
    import subprocess, sys, time
    child = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             "print('ignoring', flush=True); time.sleep(600)")
    print("child", subprocess.Popen([sys.executable, "-c", child]).pid, flush=True)
    time.sleep(600)
""")

# An HTTP server on 127.0.0.1:argv[1] with /health and a /metrics of two engines.
FAKE_SERVER = textwrap.dedent("""
    import http.server, sys

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = {"/health": b"", "/metrics": b'# TYPE x gauge\\nvllm:num_requests_running{engine="0"} 2\\n'
                    b'vllm:num_requests_running{engine="1"} 1\\n'}.get(self.path)
            self.send_response(404 if body is None else 200)
            self.end_headers()
            self.wfile.write(body or b"")

    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
""")


def python(script: str, *args: str) -> list[str]:
    return [sys.executable, "-c", script, *args]


def test_stop_kills_every_process_of_the_group(tmp_path):
    server = LoopbackServer.start(python(PARENT_AND_STUBBORN_CHILD), tmp_path / "log", free_port())
    child = None
    try:
        deadline = time.monotonic() + 30
        while "ignoring" not in server.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(server.log.read_text().split("child ", 1)[1].split()[0])
        assert sorted(server.pids()) == sorted([server.process.pid, child])
        started = time.monotonic()
        assert server.stop(grace_s=1) == -signal.SIGTERM  # the parent obeyed SIGTERM
        assert time.monotonic() - started >= 1, "the child ignores SIGTERM: only SIGKILL ends it"
        assert not running(child), "the child outlived stop()"
        assert server.pids() == []
        assert server.stop() == -signal.SIGTERM  # a second stop has nothing to do
    finally:  # only when the test failed is anything left
        for pid in (server.process.pid, child):
            if pid is not None and running(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        server.process.wait(timeout=30)


def test_wait_ready_fails_fast_with_the_log_when_the_server_exits(tmp_path):
    script = "print('no model here'); raise SystemExit(3)"
    with LoopbackServer.start(python(script), tmp_path / "log", free_port()) as server:
        started = time.monotonic()
        with pytest.raises(ServerFailed, match=r"exited \(3\) at startup(.|\n)*no model here"):
            server.wait_ready(timeout_s=120)
        assert time.monotonic() - started < 60


def test_wait_ready_gives_up_after_the_timeout(tmp_path):
    script = "print('loading', flush=True); import time; time.sleep(600)"
    with LoopbackServer.start(python(script), tmp_path / "log", free_port()) as server:
        with pytest.raises(ServerFailed, match=r"not ready after 1 s(.|\n)*loading"):
            server.wait_ready(timeout_s=1)
    assert server.pids() == []


def test_ready_server_serves_metrics_and_stops_on_leaving_the_block(tmp_path):
    port = free_port()
    with LoopbackServer.start(python(FAKE_SERVER, str(port)), tmp_path / "log", port) as server:
        assert server.wait_ready(timeout_s=60) is server
        assert server.url == f"http://127.0.0.1:{port}"
        assert metric_totals(server.metrics())["vllm:num_requests_running"] == 3
    assert server.process.returncode == -signal.SIGTERM
    assert server.pids() == []
