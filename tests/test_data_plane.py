"""The data plane's one contract (services/common/runner.py) and the device helpers.

- Both runners drive a captured graph the same way: one graph per (bucket, static shape),
  captured at warm-up, replayed by `RowRunner.call`; the LM's ticks replay give the eager
  tokens (the real model and the echo, which honours the same generator contract).
- `warm_up` reports the step alone: not the row resets, not the capture, with the model's
  device synchronised before the clock starts and before it stops (a fake clock and a
  recorded call order: no wall-clock assertion).
- The replay planner (`StreamLayout.replay_prefix`) recovers what each step sampled.
- A float32 model on CUDA computes in float32 (TF32 off), set by both loaders.
"""

from __future__ import annotations

import pytest
import torch

from moshi_grpc.models.lm import load_lm
from moshi_grpc.models.lm_gen import LMGen, SamplingConfig, StreamLayout
from moshi_grpc.services.codec.engine import CodecOptions, StreamerRunner, load_codec_model
from moshi_grpc.services.common import device, runner
from moshi_grpc.services.lm import engine as lm_engine
from moshi_grpc.services.lm.engine import (
    GenRunner,
    JoinPayload,
    LmOptions,
    StepInput,
    load_lm_model,
    make_generator,
)

SAMPLED = SamplingConfig(0.8, 10, 0.9, 20)


@pytest.fixture(scope="module")
def lm():
    return load_lm(None, "tiny", seed=3)


class ReplayOnCpu:
    """`BucketGraphs` as the runner sees it, on CPU: capture keeps static input buffers and
    the shape, run copies the inputs into them and steps on those (what a replay reads)."""

    def __init__(self, step, dev) -> None:
        self.step, self.static, self.captures = step, {}, []

    def __contains__(self, key) -> bool:
        return key in self.static

    def capture(self, key, shape, example) -> None:
        self.static[key] = (shape, tuple(t.clone() for t in example))
        self.captures.append(key)

    def run(self, key, inputs):
        shape, static = self.static[key]
        for buf, x in zip(static, inputs, strict=True):
            buf.copy_(x)
        return self.step(shape, *static)


def _script(r: GenRunner, codes: torch.Tensor) -> list:
    """Joins, a leave (rows move), idle rows (masked), a greedy and sampled mix."""
    for s in range(4):
        r.join(s, JoinPayload(SAMPLED if s % 2 else SamplingConfig.greedy(), s))
    out = []
    for t in range(codes.shape[0]):
        if t == 5:
            r.leave(1)
        slots = [s for s in (0, 2, 3) if (s + t) % 4 != 0] or [0]
        results, bucket = r.run(slots, [StepInput(codes[t, s]) for s in slots])
        out.append((bucket, [(o.ready, o.text, o.audio) for o in results]))
    return out


@pytest.mark.parametrize("model", ["real", "echo"])
def test_lm_graph_mode_captures_each_bucket_once_and_replays_the_eager_tokens(
    lm, model, monkeypatch
) -> None:
    monkeypatch.setattr(runner, "BucketGraphs", ReplayOnCpu)
    if model == "echo":
        from moshi_grpc.services.lm.echo import EchoLM

        model_lm = EchoLM()
    else:
        model_lm = lm
    cfg = model_lm.config
    codes = torch.randint(0, cfg.card, (14, 4, cfg.num_user_streams), generator=None)
    outs = []
    for graphs in (False, True):
        r = GenRunner(make_generator(model, model_lm, 8), 8, graphs)
        for b in r.ladder:
            assert r.warm_up(b) > 0
        if graphs:
            full = r.gen.full_shape()
            assert r.graphs.captures == [(b, full) for b in r.ladder]
        outs.append(_script(r, codes))
    assert outs[0] == outs[1]


def test_codec_graph_mode_captures_masked_and_unmasked(monkeypatch) -> None:
    monkeypatch.setattr(runner, "BucketGraphs", ReplayOnCpu)
    mimi = load_codec_model(CodecOptions(model="echo"))
    r = StreamerRunner(mimi.streaming_encoder(4), 4, (1920,), torch.float32, graphs=True)
    for b in r.ladder:
        r.warm_up(b)
    assert r.graphs.captures == [(1, False), (2, False), (2, True), (4, False), (4, True)]
    r.join(0, None)
    r.join(1, None)
    (codes,), bucket = r.run([1], [torch.full((1920,), 0.5)])  # row 0 idles: masked
    assert bucket == 2 and codes.shape == (8,)


class FakeClock:
    """Advances only when told: resets and captures cost a second each, a step 7 ms."""

    def __init__(self) -> None:
        self.now = 100.0
        self.events: list[str] = []

    def perf_counter(self) -> float:
        self.events.append("clock")
        return self.now


def test_warm_up_reports_the_step_alone_with_the_device_synchronised(lm, monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(runner.time, "perf_counter", clock.perf_counter)
    monkeypatch.setattr(runner, "synchronize", lambda dev: clock.events.append(f"sync {dev}"))
    monkeypatch.setattr(runner, "BucketGraphs", ReplayOnCpu)
    gen = LMGen(lm, 4)
    real_reset, real_core = gen.reset, gen.core

    def slow_reset(*a, **k):
        clock.now += 1.0  # a reset writes a dozen small tensors per row: not the step
        return real_reset(*a, **k)

    def step(*a, **k):
        clock.now += 0.007
        clock.events.append("step")
        return real_core(*a, **k)

    gen.reset, gen.core = slow_reset, step
    for graphs in (False, True):
        r = GenRunner(gen, 4, graphs)
        clock.events.clear()
        seconds = r.warm_up(4)
        assert seconds == pytest.approx(0.007)  # neither the 4 resets nor the capture
        timed = clock.events[clock.events.index("sync cpu") :]
        assert timed[:3] == ["sync cpu", "clock", "step"]  # synced, then the clock starts
        assert timed[3:5] == ["sync cpu", "clock"]  # synced again before it stops
        assert all(h is None for h in gen.host_steps)  # the rows are free again


@pytest.mark.parametrize("sampling", [SamplingConfig.greedy(), SAMPLED], ids=["greedy", "sampled"])
def test_replay_prefix_recovers_what_each_step_sampled(lm, sampling) -> None:
    cfg = lm.config
    gen = LMGen(lm, 1)
    gen.reset(0, sampling, seed=4)
    g = torch.Generator().manual_seed(2)
    emitted, sampled = [], []
    for _ in range(15):
        r = gen.step(torch.randint(0, cfg.card, (1, cfg.num_user_streams), generator=g))
        emitted.append((int(r.text[0]), r.audio[0].tolist()) if bool(r.ready[0]) else None)
        sampled.append((int(r.sampled_text[0]), r.sampled_audio[0].tolist()))
    layout = StreamLayout.of(cfg)
    prefix, text, audio = layout.replay_prefix(emitted)
    assert prefix == 15 - layout.max_delay
    for s in range(prefix):
        assert int(text[s]) == sampled[s][0]
        for q in range(cfg.dep_q):
            if s >= cfg.delays[1 + q]:  # entries a later step reads back
                assert int(audio[s, q]) == sampled[s][1][q], (s, q)
    # a gap in what was emitted cuts the prefix where the first unknown token is read
    emitted[6] = None
    assert layout.replay_prefix(emitted)[0] == 6 - layout.max_delay


def test_exact_float32_turns_tf32_off_for_float32_on_cuda_only() -> None:
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32  # (module properties: no monkeypatch)
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = True
        assert not device.exact_float32("cpu", torch.float32)
        assert not device.exact_float32("cuda", torch.bfloat16)
        assert matmul.allow_tf32 and cudnn.allow_tf32
        assert device.exact_float32("cuda:1", torch.float32)
        assert not matmul.allow_tf32 and not cudnn.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def test_both_loaders_set_the_precision_for_their_model(monkeypatch) -> None:
    from moshi_grpc.services.codec import engine as codec_engine

    seen = []
    for module in (lm_engine, codec_engine):
        monkeypatch.setattr(module, "exact_float32", lambda dev, dt: seen.append((dev, dt)))
    load_lm_model(LmOptions(config="tiny", dtype="bfloat16"))
    load_codec_model(CodecOptions(config="tiny", cpu_forms="off"))
    assert seen == [("cpu", torch.bfloat16), ("cpu", torch.float32)]


def test_dtype_names_and_devices() -> None:
    assert device.torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; one of float32, bfloat16"):
        device.torch_dtype("fp8")
    device.synchronize("cpu")  # a no-op off CUDA
    assert device.cuda_index("cuda:3") == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_draws_ignore_its_neighbours_and_the_captured_shape(dtype) -> None:
    """Real vocabularies (text 32,000, audio 2,048), default sampling: a row's sampled tokens
    are the same next to a neighbour that keeps 25 or 500 text candidates (the batch's top-k
    width), and when stepped with the captured shape (whole vocabulary, whole ring). In
    bf16 the logits tie often: `topk` orders equal values differently at different widths,
    which changed every draw of this run before candidates were defined per row."""
    from moshi_grpc.models.lm import PRESETS

    lm = load_lm(None, dict(PRESETS["small"], context=12), dtype=dtype, seed=1)
    steps = 20  # past the context: the ring wraps
    codes = torch.randint(0, 2048, (steps, 2, 8), generator=torch.Generator().manual_seed(5))

    def run(neighbour_k: int, captured: bool) -> list:
        gen = LMGen(lm, 2)
        gen.reset(0, SamplingConfig(), seed=7)
        gen.reset(1, SamplingConfig(0.9, neighbour_k, 0.9, 1000), seed=8)
        out = []
        for t in range(steps):
            if captured:
                zeros = torch.zeros(2, dtype=torch.long)
                inputs = (codes[t], torch.ones(2, dtype=torch.bool), zeros.bool(), zeros)
                with torch.inference_mode():
                    r = gen.core(
                        *inputs, torch.zeros(2, 8, dtype=torch.long), shape=gen.full_shape()
                    )
                gen.advance([0, 1])
                out.append((int(r[3][0]), r[4][0].tolist()))
            else:
                r = gen.step(codes[t])
                out.append((int(r.sampled_text[0]), r.sampled_audio[0].tolist()))
        return out

    alone_like = run(25, captured=False)  # the neighbour keeps as many text candidates
    assert run(500, captured=False) == alone_like
    assert run(25, captured=True) == alone_like


def test_an_lm_that_cannot_fit_the_gpu_is_refused_before_anything_is_allocated(
    monkeypatch,
) -> None:
    """`lm --device cuda` with the 7B in float32 and 16 slots on an 80 GB card: refused at
    once with the figures (the load never starts), not by an out-of-memory error later."""
    from moshi_grpc.models.memory_plan import MemoryPlanError

    monkeypatch.setattr(
        lm_engine, "free_memory", lambda dev: int(74.5 * 2**30)
    )  # an H100 80GB, free
    loads = []
    monkeypatch.setattr("moshi_grpc.models.lm.load_lm", lambda *a, **k: loads.append(a))
    options = LmOptions(config="moshiko-7b", device="cuda:0", dtype="float32", max_sessions=16)
    with pytest.raises(
        MemoryPlanError,
        match=r"does not fit cuda:0: float32 weights .* "
        r"at most \d+ sessions fit",
    ):
        load_lm_model(options)
    assert loads == []
    ok = LmOptions(config="moshiko-7b", device="cuda:0", dtype="bfloat16", max_sessions=16)
    lm_engine._check_fits(ok, torch.bfloat16)  # bf16 with 16 slots fits 80 GB
