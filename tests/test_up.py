"""`moshi-grpc up --demo`: three real service processes, one conversation, clean shutdown."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moshi_grpc import audio


@pytest.mark.slow
def test_up_demo_writes_reply_and_transcript(tmp_path, repo_root) -> None:
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "moshi_grpc.cli", "up", "--demo", str(out), "--demo-seconds", "2"],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Without weights the random preset is announced loudly.
    assert "NO WEIGHTS GIVEN" in proc.stderr
    assert "all services SERVING" in proc.stdout and "demo: done" in proc.stdout
    x, in_rate = audio.read_wav(out / "input.wav")
    y, rate = audio.read_wav(out / "reply.wav")
    assert in_rate == rate == 16000
    frames = -(-len(x) * 24000 // in_rate // 1920)  # ceil: the last partial frame is padded
    assert len(y) == frames * 1280  # one 80 ms frame out per frame in, at the client's rate
    assert (out / "transcript.txt").is_file()
    assert "frames        in 25, out 25" in proc.stdout
    # Every service was shut down cleanly (drained, no traceback in their logs).
    for name in ("gateway", "codec", "lm"):
        log = (out / f"{name}.log").read_text()
        assert "Traceback" not in log, log
        assert f"{name} stopped" in log, log
