"""The LM serving core: packed rows, buckets, capturable steps, replay by prefill.

Sessions run through the engine's runner (`GenRunner`: slots -> packed rows -> the smallest
bucket of the ladder), at the default 16 slots, while others join, leave (their rows move)
and idle (masked). A session's tokens must not depend on any of that.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from moshi_grpc.models.lm import load_lm
from moshi_grpc.models.lm_gen import LMGen, SamplingConfig
from moshi_grpc.services.common.buckets import RowTable, bucket_for, bucket_ladder
from moshi_grpc.services.lm.engine import (
    GenRunner,
    JoinPayload,
    LmOptions,
    Prefill,
    Start,
    StartDone,
    StepInput,
)

SLOTS = LmOptions().max_sessions  # the default: the rule must hold there


@pytest.fixture(scope="module")
def lm():
    """The LM golden fixture's model (tests/fixtures/lm: tiny config, context 10)."""
    from conftest import FIXTURES

    return load_lm(FIXTURES / "lm" / "model.safetensors", FIXTURES / "lm" / "config.json")


@pytest.fixture(scope="module")
def codes() -> torch.Tensor:
    from conftest import FIXTURES

    return torch.tensor(json.loads((FIXTURES / "lm" / "golden.json").read_text())["user_codes"])


SAMPLED = SamplingConfig(0.8, 10, 0.9, 20)


def _runner(lm, slots: int = SLOTS) -> GenRunner:
    return GenRunner(LMGen(lm, slots), slots, False)


def _solo(lm, codes, sampling, seed) -> list[tuple]:
    runner = _runner(lm, 1)
    runner.join(0, JoinPayload(sampling, seed))
    out = []
    for t in range(codes.shape[0]):
        (res,), bucket = runner.run([0], [StepInput(codes[t])])
        assert bucket == 1
        out.append((res.ready, res.text, res.audio))
    return out


def test_ladder_and_row_table() -> None:
    assert bucket_ladder(16) == (1, 2, 4, 8, 16)
    assert bucket_ladder(10) == (1, 2, 4, 8, 10)
    assert bucket_ladder(1) == (1,)
    assert bucket_for(3, (1, 2, 4, 8)) == 4
    table = RowTable(4)
    rows = [table.join(s) for s in (2, 0, 3)]
    assert rows == [0, 1, 2]
    move = table.leave(2)  # row 0 freed: the last live row (slot 3) moves into it
    assert (move.src, move.dst) == (2, 0) and table.row_of(3) == 0 and table.live == 2
    assert table.leave(0) is None and table.live == 1  # slot 0 was the last row: no move
    plan = table.plan([3])
    assert plan.rows == [0] and plan.bucket == 1 and not plan.masked


@pytest.mark.parametrize("sampling", [SamplingConfig.greedy(), SAMPLED], ids=["greedy", "sampled"])
def test_session_tokens_do_not_depend_on_bucket_or_neighbours(lm, codes, sampling) -> None:
    """The same session alone (bucket 1), among 4 and among 16 sessions that join, leave
    (rows move under it) and idle (masked rows) gives the same tokens, bit for bit."""
    steps = 24
    alone = _solo(lm, codes[:steps], sampling, seed=5)
    rng = random.Random(0)
    for crowd in (3, SLOTS - 1):
        runner = _runner(lm)
        me = SLOTS - 1  # a high slot id: its row is wherever the packing puts it
        others = list(range(crowd))
        for s in others:
            runner.join(s, JoinPayload(SAMPLED, 100 + s))
        runner.join(me, JoinPayload(sampling, 5))
        mine, buckets, t = [], set(), 0
        while t < steps:
            # churn: someone leaves (its row is refilled by a move) and someone joins
            if rng.random() < 0.3 and others:
                runner.leave(others.pop(rng.randrange(len(others))))
            if rng.random() < 0.3 and len(others) < crowd:
                free = next(s for s in range(SLOTS) if s not in others and s != me)
                runner.join(free, JoinPayload(SAMPLED, 200 + free))
                others.append(free)
            busy = [s for s in others if rng.random() < 0.7]  # the rest idle this tick
            me_steps = rng.random() < 0.8
            slots = busy + ([me] if me_steps else [])
            if not slots:
                continue
            noise = torch.randint(0, lm.config.card, (len(slots), lm.config.num_user_streams))
            payloads = [StepInput(noise[i]) for i in range(len(busy))]
            if me_steps:
                payloads.append(StepInput(codes[t]))
            results, bucket = runner.run(slots, payloads)
            buckets.add(bucket)
            if me_steps:
                r = results[-1]
                mine.append((r.ready, r.text, r.audio))
                t += 1
        assert mine == alone, f"crowd {crowd}"
        assert max(buckets) >= (4 if crowd == 3 else 8)


def test_compute_follows_load(lm, codes) -> None:
    """Rows passed to the model per tick: one session on a 16-slot replica steps one row;
    five step a bucket of 8; an idle neighbour below a busy row is masked, not dropped."""
    runner = _runner(lm)
    stepped = []
    inner = runner.gen.core

    def counting(codes, *inputs, shape):
        stepped.append(codes.shape[0])  # the rows the model computes
        return inner(codes, *inputs, shape=shape)

    runner.gen.core = counting
    runner.join(7, JoinPayload(SamplingConfig.greedy(), 0))
    for t in range(3):
        runner.run([7], [StepInput(codes[t])])
    assert stepped == [1, 1, 1]
    for s in (1, 2, 3, 4):
        runner.join(s, JoinPayload(SamplingConfig.greedy(), s))
    slots = [7, 1, 2, 3, 4]
    runner.run(slots, [StepInput(codes[3])] * 5)
    assert stepped[-1] == 8
    runner.run([4], [StepInput(codes[4])])  # slot 4 holds row 4: rows 0-3 idle, masked
    assert stepped[-1] == 8
    for s in (1, 2, 3, 4):
        runner.leave(s)
    runner.run([7], [StepInput(codes[5])])
    assert stepped[-1] == 1  # back to one row once the others left


@pytest.mark.slow
def test_every_bucket_step_traces_without_graph_breaks(lm) -> None:
    """The step core of each bucket of the default ladder compiles as one graph (what a CUDA
    graph capture needs: static shapes, no host synchronisation)."""
    plain = load_lm(None, lm.config.to_dict())  # the plain model: what a CUDA graph captures
    gen = LMGen(plain, SLOTS)
    shape = gen.full_shape()
    for row in range(SLOTS):
        gen.reset(row, SAMPLED if row % 2 else SamplingConfig.greedy(), seed=row)
    torch._dynamo.reset()
    for b in bucket_ladder(SLOTS):
        compiled = torch.compile(
            lambda *x: gen.core(*x, shape=shape), fullgraph=True, backend="eager", dynamic=False
        )
        u = plain.config.num_user_streams
        inputs = (
            torch.randint(0, plain.config.card, (b, u)),
            torch.arange(b) % 3 != 1,
            torch.zeros(b, dtype=torch.bool),
            torch.zeros(b, dtype=torch.long),
            torch.zeros(b, plain.config.dep_q, dtype=torch.long),
        )
        before = [t.clone() for t in (gen.steps, gen.tokens)]
        with torch.inference_mode():
            out = compiled(*inputs)
        assert out[0].shape == (b,) and out[1].shape == (b, plain.config.dep_q)
        assert torch.equal(gen.steps[:b], before[0][:b] + inputs[1].long())
        assert torch.equal(gen.steps[b:], before[0][b:])  # rows past the bucket untouched


def test_captured_shape_gives_the_eager_tokens(lm, codes) -> None:
    """A captured step uses the widest static values (full context span, every candidate);
    the tokens are those of the eager step, which sizes both from the host."""
    eager, wide = LMGen(lm, 2), LMGen(lm, 2)
    for gen in (eager, wide):
        gen.reset(0, SAMPLED, seed=3)
        gen.reset(1, SamplingConfig.greedy(), seed=4)
    shape = wide.full_shape()
    for t in range(16):
        user = codes[t][None].repeat(2, 1)
        a = eager.step(user)
        inputs = (user, torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool))
        inputs += (torch.zeros(2, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))
        with torch.inference_mode():
            b = wide.core(*inputs, shape=shape)
        assert torch.equal(a.sampled_text, b[3]) and torch.equal(a.sampled_audio, b[4])


@pytest.mark.parametrize("sampling", [SamplingConfig.greedy(), SAMPLED], ids=["greedy", "sampled"])
def test_prefill_equals_step_by_step_replay(lm, codes, sampling) -> None:
    """Rebuilding a row from its history in one prefill (chunks smaller than the context,
    history longer than it: the ring wraps) continues exactly like the original session."""
    total, cut = codes.shape[0], 20
    assert cut > lm.config.context  # the fixture's context is short: the ring has wrapped
    orig = LMGen(lm, 1)
    orig.reset(0, sampling, seed=9)
    history, frames = [], []
    for t in range(total):
        r = orig.step(codes[t][None])
        history.append((r.sampled_text[0], r.sampled_audio[0]))
        frames.append((bool(r.ready[0]), int(r.text[0]), r.audio[0].tolist()))
    moved = LMGen(lm, 3)
    moved.reset(2, sampling, seed=9)
    text = torch.stack([h[0] for h in history[:cut]])
    audio = torch.stack([h[1] for h in history[:cut]])
    moved.prefill(2, codes[:cut], text, audio, chunk=3)
    for t in range(cut, total):
        user = torch.zeros(3, lm.config.num_user_streams, dtype=torch.long)
        user[2] = codes[t]
        r = moved.step(user, torch.tensor([False, False, True]))
        assert (bool(r.ready[2]), int(r.text[2]), r.audio[2].tolist()) == frames[t], t


def test_runner_prefill_payload_then_frames(lm, codes) -> None:
    """The engine's path: a replay's Start payload on a fresh slot, in the same tick as another
    session's frame, then ordinary frames."""
    total, cut = codes.shape[0], 12
    orig = _solo(lm, codes, SamplingConfig.greedy(), seed=1)
    gen = LMGen(lm, 1)
    gen.reset(0, SamplingConfig.greedy(), seed=1)
    sampled = [gen.step(codes[t][None]) for t in range(cut)]
    runner = _runner(lm)
    runner.join(0, JoinPayload(SamplingConfig.greedy(), 2))
    runner.join(1, JoinPayload(SamplingConfig.greedy(), 1))
    prefill = Prefill(
        codes[:cut],
        torch.stack([s.sampled_text[0] for s in sampled]),
        torch.stack([s.sampled_audio[0] for s in sampled]),
    )
    results, bucket = runner.run([0, 1], [StepInput(codes[0]), Start(replay=prefill)])
    assert bucket == 1  # the prefill is no model step of the tick
    assert isinstance(results[1], StartDone) and results[1].prompt_frames == 0
    for t in range(cut, total):
        (r,), _ = runner.run([1], [StepInput(codes[t])])
        assert (r.ready, r.text, r.audio) == orig[t]


@pytest.mark.gpu
def test_cuda_graph_step_equals_eager(lm) -> None:
    """On CUDA: the engine captures every bucket at load; replaying a bucket's graph gives
    the eager step's tokens and leaves the state where the eager step leaves it."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (no GPU on this machine)")
    cuda_lm = load_lm(None, lm.config.to_dict(), device="cuda", seed=1)
    cfg = cuda_lm.config
    runners = {}
    for graphs in (False, True):
        runner = GenRunner(LMGen(cuda_lm, 4), 4, graphs)
        for b in runner.ladder:
            runner.warm_up(b)
        for s in range(3):
            runner.join(s, JoinPayload(SAMPLED if s else SamplingConfig.greedy(), s))
        runners[graphs] = runner
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        slots = [s for s in range(3) if torch.rand(1, generator=g) < 0.8] or [0]
        payloads = [StepInput(torch.randint(0, cfg.card, (cfg.num_user_streams,), generator=g))]
        payloads = payloads * len(slots)
        eager, _ = runners[False].run(slots, payloads)
        graphed, _ = runners[True].run(slots, payloads)
        assert eager == graphed
    assert runners[True].graphs is not None and 4 in runners[True].graphs


def test_bench_gpu_and_replay_run_on_cpu_presets(capsys) -> None:
    """The GPU benchmark's own code path (eager) and the replay benchmark, on tiny presets:
    they print their tables; figures on CPU mean nothing."""
    import argparse

    from moshi_grpc.bench import gpu, lm

    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    args = parser.parse_args(
        ["--device", "cpu", "--lm-config", "tiny", "--mimi-config", "tiny"]
        + ["--sessions", "1,2", "--steps", "2", "--dtype", "float32"]
    )
    assert gpu.run(args) == 0
    out = capsys.readouterr().out
    assert "| 2 | eager |" in out and "largest session count" in out
    parser = argparse.ArgumentParser()
    lm.add_arguments(parser)
    assert lm.run(parser.parse_args(["--config", "tiny", "--replay", "40"])) == 0
    out = capsys.readouterr().out
    assert "prefill speed-up" in out
