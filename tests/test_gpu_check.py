"""The GPU check's plumbing, on CPU: the script, the bench's search and its out-of-memory path.

`tools/gpu_check.sh --cpu-plumbing` runs the same steps as on a GPU machine (install from
.whl/ as a dry run, the gpu-marked tests, which skip, the memory plan, the bench on tiny
presets) and must leave every file under $OUT. The bench's own logic (one generator per
session count, the bisection, an out-of-memory error ending one count but not the run) is
checked with the model's timings replaced, so that it runs in a moment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moshi_grpc.bench import gpu
from moshi_grpc.bench.codec import CodecBucketTiming
from moshi_grpc.bench.lm import fake_history
from moshi_grpc.models.lm import load_lm
from moshi_grpc.models.lm_gen import LMGen
from moshi_grpc.models.memory_plan import step_temporaries

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "gpu_check.sh"


def _check(tmp_path: Path, python: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=python)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--cpu-plumbing"], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=280,
    )  # fmt: skip
    return proc, out


@pytest.mark.slow
def test_cpu_plumbing_runs_every_step_and_keeps_its_files(tmp_path: Path) -> None:
    proc, out = _check(tmp_path, sys.executable)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("gpu tests", "plan", "bench"):
        assert f"{name}: exit 0" in summary
    assert "0 step(s) failed" in summary
    files = {p.name for p in out.iterdir()}
    assert {"summary.txt", "env.txt", "pytest.log", "junit.xml", "plan.md", "bench.log"} <= files
    assert len(files) <= 8  # what a device call brings back
    assert 'failures="0"' in (out / "junit.xml").read_text()
    assert "skipped" in (out / "pytest.log").read_text()  # gpu tests collect, then skip here
    assert "Sessions that fit" in (out / "plan.md").read_text()
    lines = [json.loads(x) for x in (out / "bench.jsonl").read_text().splitlines()]
    assert lines[0]["kind"] == "start" and lines[-1] == {
        "kind": "result", "device": "cpu", "mode": "eager", "budget_ms": 1000000.0, "sessions": 3
    }  # fmt: skip
    measured = {x["sessions"] for x in lines if x["kind"] == "timing"}
    assert measured == {1, 2, 3}  # the listed counts, then the search up to --search-max


def test_failed_steps_are_counted_and_the_check_fails(tmp_path: Path) -> None:
    proc, out = _check(tmp_path, "false")  # a python that fails at once
    summary = (out / "summary.txt").read_text()
    assert proc.returncode != 0
    assert "gpu tests: exit 1" in summary and "bench: exit 1" in summary
    assert "0 step(s) failed" not in summary and "step(s) failed" in summary


def test_largest_passing_bisects_and_stops_when_out_of_time() -> None:
    calls = []

    def ok(n: int) -> bool:
        calls.append(n)
        return n <= 37

    assert gpu.largest_passing(ok, 0, 100) == 37
    assert len(calls) <= 7 and len(set(calls)) == len(calls)
    assert gpu.largest_passing(ok, 5, 6) == 5  # nothing between: no call
    budget = iter([True, True])

    def timed(n: int) -> bool:
        return next(budget) and n <= 37  # the third call: StopIteration, out of time

    assert gpu.largest_passing(timed, 0, 100) == 25  # 50 fails, 25 passes, then time is up


def test_out_of_memory_is_recognised_through_the_errors_it_causes() -> None:
    """A capture that runs out of memory fails again when its graph context closes: that
    second error ends the session count like the first, any other error is a bug."""
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    try:
        try:
            raise oom
        except RuntimeError:
            raise RuntimeError("operation not permitted when stream is capturing") from None
    except RuntimeError as exc:
        assert exc.__context__ is oom and gpu._is_oom(exc)
    assert gpu._is_oom(oom) and not gpu._is_oom(RuntimeError("shape mismatch"))


def test_fake_history_fills_the_cache_in_place() -> None:
    """No whole-cache tensor is drawn on the host and copied (issue 20 item 1); after a
    capture only the counters and token rings are refilled."""
    lm = load_lm(None, "small")
    gen = LMGen(lm, 2)
    layer = gen.cache.k[0].nbytes
    peak, _ = step_temporaries(lambda: fake_history(gen, 100, seed=1))
    assert peak < layer / 8
    assert gen.host_steps == [100, 100] and gen.steps.tolist() == [100, 100]
    assert float(gen.cache.k[0].std()) > 0.4  # filled with N(0, 0.5)
    before = [t.clone() for t in (*gen.cache.k, *gen.cache.v)]
    tokens = gen.tokens.clone()
    gen.steps[:] = 3
    fake_history(gen, 200, seed=2, kv=False)
    assert all(torch.equal(a, b) for a, b in zip(before, (*gen.cache.k, *gen.cache.v)))
    assert gen.steps.tolist() == [200, 200] and not torch.equal(tokens, gen.tokens)


def test_bench_builds_one_generator_per_count_and_outlives_out_of_memory(
    monkeypatch, capsys, tmp_path: Path
) -> None:
    """Every mode of a session count steps one generator; an out-of-memory error ends that
    count, the search goes on below it, and the tables so far are printed."""
    built: list[int] = []
    real = gpu.fresh_generator

    def counting(lm, sessions):
        built.append(sessions)
        return real(lm, sessions)

    def timings(self, mode: str, steps: int) -> list[float]:
        if self.sessions >= 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.46 GiB")
        return [0.01 * self.sessions] * steps

    def codec(**kw) -> list[CodecBucketTiming]:
        s = kw["sessions"][0]
        return [CodecBucketTiming(s, s, g, (1.0, 2.0), (1.0, 2.0), (2.0, 4.0), 0.1)
                for g in kw["graphs"]]  # fmt: skip

    monkeypatch.setattr(gpu, "fresh_generator", counting)
    monkeypatch.setattr(gpu._LmBucket, "time_steps", timings)
    monkeypatch.setattr("moshi_grpc.bench.codec.time_codec_buckets", codec)
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    journal = tmp_path / "bench.jsonl"
    args = parser.parse_args(
        ["--device", "cpu", "--lm-config", "tiny", "--mimi-config", "tiny", "--dtype"]
        + ["float32", "--sessions", "1,2,4", "--steps", "2", "--search-max", "6"]
        + ["--out-json", str(journal)]
    )
    assert gpu.run(args) == 0
    out = capsys.readouterr().out
    assert sorted(built) == [1, 2, 3, 4]  # once per count, whatever the modes
    assert "4 sessions: out of memory (LM eager: CUDA out of memory." in out
    assert "searching (eager) between 2 and 4 sessions" in out
    assert "| 2 | eager-full | 20.0 / 20.0 |" in out  # the table kept the measured counts
    assert "| 4 | - | - | - | - | - | - | LM eager: CUDA out of memory." in out
    assert "largest session count found by the search (eager): 2" in out
    kinds = [json.loads(x)["kind"] for x in journal.read_text().splitlines()]
    assert kinds.count("timing") == 4 and kinds.count("memory") == 2 and kinds[-1] == "result"
