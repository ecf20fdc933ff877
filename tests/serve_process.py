"""A real ``vllm serve`` process on 127.0.0.1 for end-to-end tests, and its HTTP calls.

Each server runs in its own process group (the API server and its engine core),
logs to a file, and is stopped with the whole group whatever the test does.
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
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vllm_nf4kv.tools.stats import collect, fetch
from vllm_nf4kv.ttl.config import ENV_VAR

MODEL_NAME = "smollm2"
KV_BYTES = 256 * 2**20
BLOCK_SIZE = 32  # small blocks and prompts keep each request short on CPU
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

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        """POST JSON to the server; returns the HTTP status and the decoded answer."""
        request = urllib.request.Request(
            f"{self.url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def completion(self, text: str, **fields) -> dict:
        """One completion (one greedy token) with extra body ``fields``; its answer."""
        body = {"model": MODEL_NAME, "prompt": text, "max_tokens": 1, "temperature": 0, **fields}
        status, answer = self.post("/v1/completions", body)
        assert status == 200, (status, answer)
        return answer

    def complete(self, text: str) -> int:
        """One completion (one generated token); returns its prompt token count."""
        return self.completion(text)["usage"]["prompt_tokens"]

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


def vllm_command(model_dir: Path, port: int, *extra: str, eager: bool = True) -> list[str]:
    """``eager=False`` keeps vLLM's torch.compile (slower start; CPU pipeline parallel needs it)."""
    command = [
        str(Path(sys.executable).with_name("vllm")),
        "serve",
        str(model_dir),
        "--served-model-name",
        MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--kv-cache-memory-bytes",
        str(KV_BYTES),
        "--max-model-len",
        "2048",
        "--block-size",
        str(BLOCK_SIZE),
        *extra,
    ]
    return command + ["--enforce-eager"] if eager else command


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


def launch(model_dir: Path, log: Path, *extra: str, env: dict[str, str], eager: bool = True) -> Server:
    port = free_port()
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            vllm_command(model_dir, port, *extra, eager=eager),
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
