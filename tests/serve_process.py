"""A real ``vllm serve`` process on 127.0.0.1 for end-to-end tests, and its HTTP calls.

Each server is a :class:`vllm_nf4kv.tools.loopback_server.LoopbackServer`: its own
process group (the API server and its engine core), a log file, and stopped with
the whole group whatever the test does.
A server started with :meth:`ControlledClock.env` in its environment runs its
TTL pool on that clock (``tests/clock_control/sitecustomize.py``): time stands
still for the TTL until the test advances it.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from vllm_nf4kv.tools.loopback_server import LoopbackServer, ServerFailed, serve_env, stop_group
from vllm_nf4kv.tools.stats import collect
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


def prompt(tag: str) -> str:
    return f"[{tag}] " + TEXT * 2  # about 100 tokens: three full 32-token blocks and a partial one


@dataclass
class Server(LoopbackServer):
    """A :class:`LoopbackServer` with the tests' HTTP calls, and the clock its TTL pool runs on, if any."""

    clock: ControlledClock | None = None

    def clock_installed(self) -> bool:
        """Whether the test clock reached a process of this server (sitecustomize logs it)."""
        return "nf4kv test clock:" in self.log.read_text(errors="replace")

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
        return collect(self.metrics(), self.url)

    def stats_after(self, queries_before: float, prompt_tokens: int):
        """Stats once the front end has recorded ``prompt_tokens`` more queried tokens."""
        deadline = time.monotonic() + 15
        while True:
            stats = self.stats()
            if stats.queries >= queries_before + prompt_tokens or time.monotonic() > deadline:
                return stats
            time.sleep(0.1)


def server_env(**extra: str) -> dict[str, str]:
    env = serve_env()  # a plain `vllm serve`: engine core in its own process
    env.pop(ENV_VAR, None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def serve_args(*extra: str, eager: bool = True) -> list[str]:
    """``vllm serve`` arguments after the model, host and port.

    ``eager=False`` keeps vLLM's torch.compile (slower start; CPU pipeline parallel needs it).
    """
    args = [
        "--served-model-name",
        MODEL_NAME,
        "--kv-cache-memory-bytes",
        str(KV_BYTES),
        "--max-model-len",
        "2048",
        "--block-size",
        str(BLOCK_SIZE),
        *extra,
    ]
    return args + ["--enforce-eager"] if eager else args


def launch(
    model_dir: Path,
    log: Path,
    *extra: str,
    env: dict[str, str],
    eager: bool = True,
    clock: ControlledClock | None = None,
) -> Server:
    """Start ``vllm serve``; with ``clock`` its TTL pool runs on that clock (``Server.clock``)."""
    if clock is not None:
        env = {**env, **clock.env(env.get("PYTHONPATH"))}
    return Server.serve(model_dir, log, *serve_args(*extra, eager=eager), env=env, clock=clock)


def wait_ready(server: Server) -> Server:
    try:
        return server.wait_ready(STARTUP_TIMEOUT_S)
    except ServerFailed as error:
        pytest.fail(str(error))


stop = stop_group  # stop(server.process): the server and its engine core, the whole process group
