"""The bounded soak (``scripts/soak.py``) run for real, short: nothing lost, no TTL violated.

A second, shorter run checks the checker: against a server with no TTL it
assumes a 1 s one, so prefixes that come back after more than that (plus the
slack) and still hit must be reported as violations, with exit status 1.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import MODEL_DIR, REPO, TEXTS

pytestmark = pytest.mark.slow


def soak(tmp_path, *flags: str) -> tuple[int, dict, str]:
    figures = tmp_path / "soak.json"
    command = [
        sys.executable, str(REPO / "scripts" / "soak.py"), "--model", str(MODEL_DIR),
        "--text", str(TEXTS / "moby_dick.txt"), "--log", str(tmp_path / "server.log"),
        "--json", str(figures), *flags,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    report = json.loads(figures.read_text()) if figures.exists() else {}
    return done.returncode, report, done.stdout + done.stderr


def test_soak_loses_nothing_and_keeps_the_ttl(model_dir, tmp_path):
    code, report, output = soak(tmp_path, "--duration-s", "45", "--clients", "3", "--ttl-s", "2")
    print(output)
    assert code == 0, output
    assert report["errors"] == report["lost"] == report["violations"] == 0, report
    assert report["metrics_problems"] == [], report
    assert report["completed"] >= 20 and report["aborted"] >= 1 and report["with_request_ttl"] >= 1
    assert report["hits"] >= 1, "no prefix hit: the load shares nothing"
    assert report["checked"] >= 1, "no prefix came back after its TTL: the TTL check tested nothing"
    assert report["expired_blocks"] > 0


def test_soak_reports_hits_past_a_ttl_the_server_does_not_have(model_dir, tmp_path):
    code, report, output = soak(
        tmp_path, "--duration-s", "25", "--clients", "2", "--ttl-s", "0", "--assume-ttl-s", "1",
        "--slack-s", "0.5", "--request-ttl-share", "0",
    )  # fmt: skip
    assert code == 1, output
    assert report["violations"] >= 1, report
    assert "TTL violations" in output
