"""Test only: give the prefix-cache TTL pool of a ``vllm serve`` a clock the test controls.

``tests/serve_process.py`` (``ControlledClock.env``) puts this directory on a
server's ``PYTHONPATH`` and sets ``TEST_NF4KV_CLOCK_FILE`` (not ``NF4KV_*``:
the plugin refuses unknown names there). Python imports ``sitecustomize`` at
startup in every process that inherits the environment, the engine core that
vLLM starts included. Without the variable this module does nothing. With it,
the default ``clock`` of ``vllm_nf4kv.ttl.pool.enable_ttl`` (``time.monotonic``)
becomes a clock that reads the seconds written in that file and stands still
until the test writes a later value, so whether "the TTL has passed" is the
test's decision, not the machine's load. It adds one microsecond per reading,
so it never repeats a value (a TTL of 0 expires a block at its next lookup, as
with the real clock) and never goes backwards. No product setting is involved:
the hook patches the function's keyword default when the module is imported.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

CLOCK_FILE_VAR = "TEST_NF4KV_CLOCK_FILE"
TARGET = "vllm_nf4kv.ttl.pool"
TICK_S = 1e-6  # what one reading adds: strictly increasing, negligible against any TTL


class FileClock:
    """Seconds from a file the test rewrites (atomically); never repeats, never goes back."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.last = float("-inf")

    def __call__(self) -> float:
        with open(self.path) as file:  # a missing or bad file is a broken test: fail loudly
            written = float(file.read())
        self.last = max(self.last + TICK_S, written)
        return self.last


def _patch(module) -> None:
    defaults = module.enable_ttl.__kwdefaults__ or {}
    if "clock" not in defaults:
        raise RuntimeError(f"{TARGET}.enable_ttl has no keyword default 'clock': update {__file__}")
    defaults["clock"] = FileClock(os.environ[CLOCK_FILE_VAR])
    module.enable_ttl.__kwdefaults__ = defaults
    where = f"{os.environ[CLOCK_FILE_VAR]} (pid {os.getpid()})"
    print(f"nf4kv test clock: {TARGET} reads {where}", file=sys.stderr, flush=True)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self.loader = loader

    def __getattr__(self, name):  # get_source, get_filename, ...: the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


if os.environ.get(CLOCK_FILE_VAR):
    if TARGET in sys.modules:
        _patch(sys.modules[TARGET])
    else:
        sys.meta_path.insert(0, _Finder())
