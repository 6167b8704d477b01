"""The benchmarks the README quotes run and print the tables it shows: a tiny smoke run of
`bench services` and `bench gateway`, and `bench lm|codec --reference` beside the reference
package (the LM run checks greedy parity; skipped only where no reference venv is found).
Each is parsed, so a table that lost a column, a row or its numbers fails."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _bench(*args: str, timeout: float = 300) -> str:
    """`moshi-grpc bench ...` (the console script's code path); its stdout, rc 0 required."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "moshi_grpc.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _reference_python() -> str:
    """The reference venv's python: MOSHI_REFERENCE_PYTHON, else `.venv-reference` in the
    repository (what ../shared/tools/reference-venv makes) or beside it; skip if none."""
    candidates = [os.environ.get("MOSHI_REFERENCE_PYTHON")]
    candidates += [
        str(d / ".venv-reference" / "bin" / "python") for d in (REPO_ROOT, REPO_ROOT.parent)
    ]
    for path in filter(None, candidates):
        if Path(path).is_file() and os.access(path, os.X_OK):
            return path
    pytest.skip(
        "no reference venv found (MOSHI_REFERENCE_PYTHON, or .venv-reference in or beside "
        "the repository: ../shared/tools/reference-venv makes one)"
    )


def test_bench_services_prints_a_row_per_service_and_session_count() -> None:
    out = _bench(
        "services", "--model", "echo", "--sessions", "1,2", "--frames", "3", "--warmup", "1"
    )
    rows = {}
    for line in out.splitlines():
        cols = line.split()
        if len(cols) == 11 and cols[0] in ("encode", "decode", "lm") and cols[1].isdigit():
            rows[(cols[0], int(cols[1]))] = cols[2:]
    assert set(rows) == {(s, n) for s in ("encode", "decode", "lm") for n in (1, 2)}, out
    for (_, sessions), cols in rows.items():
        fps, batch, biggest, p50, p99, direct, in_svc, wall = map(float, cols[:8])
        assert cols[8].endswith("%") and float(cols[8][:-1]) > -100
        assert fps > 0 and 1 <= batch <= biggest <= sessions
        assert 0 < p50 <= p99 and direct > 0 and in_svc > 0 and wall > 0


def test_bench_gateway_prints_every_frame_returned() -> None:
    out = _bench("gateway", "--sessions", "1,2", "--seconds", "0.5", "--rounds", "1")
    row = re.compile(r"^\s*(\d+)\s+(mux|per-session)\s+\|(.*)$")
    found = {}
    for line in out.splitlines():
        m = row.match(line)
        if m:
            found[int(m.group(1))] = m.group(3)
    assert set(found) == {1, 2}, out
    for sessions, rest in found.items():
        via, direct, added, cpu, counts = (part.split() for part in rest.split("|"))
        assert all(v.endswith("ms") for v in via + direct + added + cpu)
        assert 0 < float(via[0][:-2]) <= float(via[1][:-2])
        assert float(cpu[0][:-2]) > 0
        sent, received, lost, late, dropped = map(int, counts)
        assert sent == received == sessions * 6 and lost == 0  # 0.5 s: 6 frames each
        assert late + dropped <= received


@pytest.mark.reference
def test_bench_lm_reference_greedy_parity() -> None:
    python = _reference_python()
    out = _bench(
        "lm", "--reference", python, "--config", "tiny", "--batch", "1", "--steps", "1",
        "--rounds", "1", "--warmup", "0", "--fill", "8", "--cpu-forms", "off",
    )  # fmt: skip
    (verdict,) = [
        line for line in out.splitlines() if line.startswith("greedy tokens vs reference")
    ]
    assert verdict.endswith(": identical"), out
    (row,) = [line.split() for line in out.splitlines() if line.split()[:1] == ["1"]]
    assert len(row) == 8 and all(float(v) > 0 for v in row[1:]), out


@pytest.mark.reference
def test_bench_codec_reference_times_both_on_the_same_weights() -> None:
    python = _reference_python()
    out = _bench(
        "codec", "--reference", python, "--batch", "1", "--frames", "2", "--warmup", "1",
        "--rounds", "1", "--cpu-forms", "off",
    )  # fmt: skip
    wall = out.split("wall clock")[1].split("process CPU time")[0]
    (row,) = [line for line in wall.splitlines() if line.strip().startswith("1 ")]
    ours, ref, ratios = (part.split() for part in row.split("|"))
    assert ours[0] == "1" and all(float(v) > 0 for v in ours[1:] + ref + ratios), out
    assert len(ref) == 3 and len(ratios) == 3
