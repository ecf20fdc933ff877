"""A real ``vllm serve`` process on 127.0.0.1 for end-to-end tests, and its HTTP calls.

Each server runs in its own process group (the API server and its engine core),
logs to a file, and is stopped with the whole group whatever the test does.
A server started with :meth:`ControlledClock.env` in its environment runs its
TTL pool on that clock (``tests/clock_control/sitecustomize.py``): time stands
still for the TTL until the test advances it.
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
CLOCK_DIR = Path(__file__).resolve().with_name("clock_control")  # holds the test-only sitecustomize.py
CLOCK_FILE_VAR = "TEST_NF4KV_CLOCK_FILE"  # read there
CLOCK_TICK_S = 1e-6  # what each reading adds, as there


class ControlledClock:
    """A TTL clock that stands still until :meth:`advance`: "the TTL has passed" is the test's call.

    Use it in-process as the pool's ``TTLState.clock``, or give a server ``env()``:
    the server's engine core then reads the time from ``path``. Like the real
    clock it never returns the same value twice (each reading adds a microsecond).
    """

    def __init__(self, path: Path | None = None, start: float = 1000.0) -> None:
        self.path, self.now, self.last = path, start, float("-inf")
        self._write()

    def __call__(self) -> float:
        self.last = max(self.last + CLOCK_TICK_S, self.now)
        return self.last

    def advance(self, seconds: float) -> None:
        assert seconds > 0, seconds
        self.now += seconds
        self._write()

    def _write(self) -> None:
        if self.path is not None:  # atomically: the server may read at any moment
            partial = self.path.with_name(self.path.name + ".partial")
            partial.write_text(repr(self.now))
            os.replace(partial, self.path)

    def env(self, pythonpath: str | None = None) -> dict[str, str]:
        """What a server's environment needs for its TTL pool to read this clock (``PYTHONPATH`` kept)."""
        assert self.path is not None, "an in-process clock has no file"
        path = [str(CLOCK_DIR), *filter(None, [pythonpath])]
        return {CLOCK_FILE_VAR: str(self.path), "PYTHONPATH": os.pathsep.join(path)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prompt(tag: str) -> str:
    return f"[{tag}] " + TEXT * 2  # about 100 tokens: three full 32-token blocks and a partial one


class Server:
    def __init__(
        self, url: str, process: subprocess.Popen, log: Path, clock: ControlledClock | None = None
    ) -> None:
        self.url, self.process, self.log, self.clock = url, process, log, clock

    def clock_installed(self) -> bool:
        """Whether the test clock reached a process of this server (sitecustomize logs it)."""
        return "nf4kv test clock:" in self.log.read_text(errors="replace")

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


def launch(
    model_dir: Path,
    log: Path,
    *extra: str,
    env: dict[str, str],
    eager: bool = True,
    clock: ControlledClock | None = None,
) -> Server:
    """Start ``vllm serve``; with ``clock`` its TTL pool runs on that clock (``Server.clock``)."""
    port = free_port()
    if clock is not None:
        env = {**env, **clock.env(env.get("PYTHONPATH"))}
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            vllm_command(model_dir, port, *extra, eager=eager),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return Server(f"http://127.0.0.1:{port}", process, log, clock)


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
