"""CI run of the load test in its short mode (tools/loadtest.py --short): 50 concurrent
Converse sessions through real codec/LM/gateway subprocesses (echo models), every frame
accounted for, nothing crashed. The full 200-session load and the 5-minute soak are the same
script without --short (see docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from moshi_grpc.services.gateway.config import MAX_BUDGET_MS


@pytest.mark.slow
def test_loadtest_short_mode(tmp_path) -> None:
    out = tmp_path / "loadtest.json"
    # The largest budget a session may ask (10 s): what is checked here is that 50 sessions
    # at once are all served and every frame accounted for, not this 2-core machine's speed.
    # At the tool's default (1 s), admission may rightly refuse sessions while a busy
    # machine's recent step times are slow; refusals are tests/test_gateway_admission.py's.
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "loadtest.py"), "--short"]
    cmd += ["--budget-ms", str(MAX_BUDGET_MS), "--json", str(out)]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO_ROOT,
    )
    print(proc.stdout)
    report = json.loads(out.read_text())
    (phase,) = report["phases"]
    assert phase["phase"] == "echo"
    assert phase["sessions_held"] == phase["sessions_requested"] == 50
    assert phase["refused"] == 0 and phase["failed_after_admission"] == 0
    assert phase["frames_unaccounted"] == 0
    assert phase["frames_sent"] == phase["frames_out"] > 50 * 40
    assert not phase["crashed"] and not phase["errors"]
    # Every session that ended OK got its SessionEnded summary (docs/RELIABILITY.md,
    # finding 1: endings wait for the reply being written before the summary).
    assert phase["summaries_missing"] == 0
    # Every silent frame has a cause: late, dropped, or the LM's initial delay (1 frame with
    # the echo LM's delays, per session).
    assert phase["frames_silence_other"] <= 50
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["ok"] is True
    assert "PASS" in proc.stdout


def test_loadtest_refuses_unbounded_or_remote_runs() -> None:
    script = str(REPO_ROOT / "tools" / "loadtest.py")
    for extra in (["--sessions", "5000"], ["--duration", "99999"], ["--gateway", "10.0.0.1:1"]):
        proc = subprocess.run(
            [sys.executable, script, *extra], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode != 0
        assert "must" in proc.stderr
