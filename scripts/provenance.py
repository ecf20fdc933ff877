"""Where a benchmark's numbers come from: the git revision of the code that made them and the CPU.

Every results file under docs/results/ carries this line, so a figure can be traced to the
tree and machine that produced it (``+changes``: the tree differed from the revision).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def provenance(*paths: str) -> str:
    """``git REV[+changes], CPU model, N cores``; `paths` (default: the package) decide ``+changes``."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    changed = git("status", "--porcelain", "--", *(paths or ("vllm_nf4kv",)))
    revision = git("rev-parse", "--short", "HEAD") + ("+changes" if changed else "")
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )  # fmt: skip
    return f"git {revision}, {cpu}, {os.cpu_count()} cores"
