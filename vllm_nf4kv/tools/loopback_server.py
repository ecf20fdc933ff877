"""A throwaway ``vllm serve`` on 127.0.0.1: start it, wait until it answers, read ``/metrics``, stop it.

The serving benchmark (``scripts/bench_serve.py``), the soak (``scripts/soak.py``)
and the end-to-end tests (``tests/serve_process.py``) each run real servers of
their own for a while; this module is the one way they start and stop them.
Stopping is the part that is easy to get wrong: ``vllm serve`` is several
processes (the API server, its engine core and, on CPU, a worker; more with
``--api-server-count`` or parallelism), and a signal to the one process that was
started can leave the engine core running, holding cores, memory and the KV
cache after its caller has gone. So here:

* the server leads a process group of its own (``start_new_session=True``);
* :meth:`LoopbackServer.stop` signals the whole group (SIGTERM, or SIGINT),
  waits a grace period for every process of it, SIGKILLs the group if any is
  left, and returns only when none is (or raises);
* it listens on 127.0.0.1 only, on a free port unless given one, and logs to a
  file, whose tail :meth:`LoopbackServer.wait_ready` quotes when the server dies
  at startup or does not answer in time.

``vllm`` is the executable next to ``sys.executable`` (the running virtual
environment's). Process groups are read from ``/proc`` (Linux, as vLLM's CPU
backend). Only the standard library is imported. What each caller adds (the
test clock, RSS sampling, log parsing) stays with the caller.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

VLLM = Path(sys.executable).with_name("vllm")
HOST = "127.0.0.1"
STOP_GRACE_S = 30.0  # for the whole group to exit after the signal, before SIGKILL
KILL_WAIT_S = 30.0  # for SIGKILLed processes to be gone


class ServerFailed(RuntimeError):
    """The server exited at startup, or did not answer in time; the message ends with its log's tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def serve_env(**extra: str) -> dict[str, str]:
    """This process's environment for a server, plus ``extra``.

    ``VLLM_ENABLE_V1_MULTIPROCESSING`` is dropped (unless ``extra`` sets it):
    ``vllm serve`` then runs its engine core in a process of its own, as
    deployed, even where the caller (the test suite) turned it off for
    in-process engines.
    """
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    env.update(extra)
    return env


def vllm_serve(model: str | Path, port: int, *args: str) -> list[str]:
    """The command line of ``vllm serve model`` on 127.0.0.1:``port``, with ``args``."""
    return [str(VLLM), "serve", str(model), "--host", HOST, "--port", str(port), *args]


def _stat(pid: int | str) -> list[str]:
    """``/proc/PID/stat`` after the command name: state, ppid, pgrp, ... ([] when gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    fields = _stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def group_pids(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` that still run (zombies left out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(entry.name)
            if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def _group_gone(process: subprocess.Popen, deadline: float) -> bool:
    """Wait until ``process`` has exited and no process of its group is left, or ``deadline``."""
    while True:
        if process.poll() is not None and not group_pids(process.pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def stop_group(
    process: subprocess.Popen, grace_s: float = STOP_GRACE_S, first_signal: int = signal.SIGTERM
) -> int:
    """End ``process`` and every process of its group (it leads one: :meth:`LoopbackServer.start`).

    ``first_signal`` goes to the whole group; whatever of it is left after
    ``grace_s`` gets SIGKILL. Returns ``process``'s exit status once no process
    of the group is left; raises :class:`RuntimeError` if one survives SIGKILL.
    """
    pgid = process.pid
    for sig, wait_s in ((first_signal, grace_s), (signal.SIGKILL, KILL_WAIT_S)):
        if process.poll() is None or group_pids(pgid):  # never signal a group id that may be reused
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
        if _group_gone(process, time.monotonic() + wait_s):
            return process.returncode
    raise RuntimeError(f"processes {group_pids(pgid)} of group {pgid} survived SIGKILL")


@dataclass
class LoopbackServer:
    """A server process leading its own process group, listening on 127.0.0.1:``port``, logging to ``log``.

    A context manager: leaving the ``with`` block stops it.
    """

    process: subprocess.Popen
    port: int
    log: Path

    @classmethod
    def start(
        cls,
        command: list[str],
        log: Path,
        port: int,
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        **fields,
    ):
        """Run ``command`` (which serves on 127.0.0.1:``port``) in a new process group, output to ``log``.

        ``fields``: those a subclass adds.
        """
        log = Path(log)
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )
        return cls(process, port, log, **fields)

    @classmethod
    def serve(
        cls,
        model: str | Path,
        log: Path,
        *args: str,
        env: dict[str, str] | None = None,
        port: int = 0,
        **fields,
    ):
        """Start ``vllm serve model --host 127.0.0.1 --port PORT *args`` (``port`` 0: a free one)."""
        port = port or free_port()
        return cls.start(vllm_serve(model, port, *args), log, port, env=env, **fields)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = 300, path: str = "/health"):
        """``self`` once ``path`` answers 200; :class:`ServerFailed` if the process exits or time is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise ServerFailed(
                    f"{self.process.args[0]} exited ({self.process.returncode}) at startup; "
                    f"{self.log} ends with:\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}{path}", timeout=2) as response:
                    if response.status == 200:
                        return self
            if time.monotonic() > deadline:
                raise ServerFailed(
                    f"{self.url}{path} not ready after {timeout_s:g} s; "
                    f"{self.log} ends with:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def metrics(self, timeout_s: float = 30) -> str:
        """The Prometheus text of ``/metrics`` (parse it with ``tools.stats.parse_metrics``)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=timeout_s) as response:
            return response.read().decode("utf-8", "replace")

    def pids(self) -> list[int]:
        """The server's processes that still run (its process group)."""
        return group_pids(self.process.pid)

    def stop(self, grace_s: float = STOP_GRACE_S, first_signal: int = signal.SIGTERM) -> int:
        """End every process of the server (:func:`stop_group`); returns the server's exit status."""
        return stop_group(self.process, grace_s, first_signal)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
