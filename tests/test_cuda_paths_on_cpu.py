"""The CUDA paths of the serving core, proven on a CPU build (issue 20, "Prove on CPU").

1. Placement and host syncs (tests/virtual_cuda.py's `VirtualCuda`): the LM step of every
   bucket of the default 16-slot ladder exactly as a captured step runs it (`LMGen.core`
   with `full_shape()`), on a moshiko-shaped model (text 32,000, audio 2,048, 8 + 8
   streams, few small layers); the LM prefill (not captured: host reads allowed, devices
   checked); the Mimi encode and decode steps (`step_unchecked`, masked and unmasked).
   Models are loaded on `cuda:1` while the current device is `cuda:0`, so anything placed
   on "the" CUDA device rather than the model's shows as a device mismatch. Each step runs
   in `strict()` (no host read, no transfer) and must equal the same step on the CPU.
2. Graph semantics (`EmulatedBucketGraphs`): the engines' runners capture every bucket at
   warm-up and replay it for many ticks with joins, leaves (row moves), idle (masked) rows,
   forced tokens, a prefill and a wrapped ring; every tick's outputs and the whole state
   (for the LM: of every live row; free rows hold the warm-up's random seeds) equal an
   eager twin's, bit for bit. A host value planted in the step goes stale under replay
   while eager stays right.
   The project's own `BucketGraphs` runs too, through the virtual device's `torch.cuda`
   stand-ins (a capture there is strict and holds the ops of its stream's device only).
3. Defects a GPU would have shown (issue 20 items 2 and 4, fixed; kept here): a capture
   or a sync on the current device instead of the model's, a warm-up timing launches.

Everything that touches today's data-plane API is in the adapter section below.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
import torch
from virtual_cuda import (
    CPU_BUILD,
    EagerBucketGraphs,
    EmulatedBucketGraphs,
    VirtualCuda,
)

from moshi_grpc.models.lm import load_lm
from moshi_grpc.models.lm_gen import CoreShape, LMGen, SamplingConfig
from moshi_grpc.models.mimi import load_mimi
from moshi_grpc.services.codec import engine as codec_engine
from moshi_grpc.services.common import cuda_graphs
from moshi_grpc.services.common import runner as row_runner
from moshi_grpc.services.common.batching import DEFERRED
from moshi_grpc.services.common.buckets import bucket_ladder
from moshi_grpc.services.lm import engine as lm_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SLOTS = lm_engine.LmOptions().max_sessions  # the default ladder: 1, 2, 4, 8, 16
FRAME = 1920
MODEL_DEVICE = "cuda:1"  # the current device stays cuda:0 (see the module docstring)
SAMPLINGS = [
    SamplingConfig.greedy(),
    SamplingConfig(),  # the defaults: top-k 25 / 250
    SamplingConfig(0.9, 0, 1.0, 0),  # every candidate: top-k over 32,000 and 2,048
]


# ==== adapter: today's data-plane API, in one place =========================================
# When the API of LMGen, the runners or BucketGraphs moves, update these functions (and
# nothing below them).


def lm_generator(lm: Any, rows: int) -> LMGen:
    return LMGen(lm, rows)


def lm_join(gen: LMGen, row: int, sampling: SamplingConfig, seed: int) -> None:
    gen.reset(row, sampling, seed)


def lm_captured_step(gen: LMGen) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The step a CUDA graph captures (`GenRunner`): the core at its widest static shape."""
    shape = gen.full_shape()
    return lambda *inputs: gen.core(*inputs, shape=shape)


def lm_step_inputs(gen: LMGen, codes: torch.Tensor, active: torch.Tensor) -> tuple:
    """The captured step's inputs on the generator's device; rows where `active` and
    `row % 4 == 3` are forced (they take given tokens instead of sampling)."""
    b, cfg = codes.shape[0], gen.lm.config
    forced = active & (torch.arange(b) % 4 == 3)
    f_text = torch.arange(b) % cfg.text_card
    f_audio = (torch.arange(b)[:, None] * 7 + torch.arange(cfg.dep_q)) % cfg.card
    return tuple(t.to(gen.device) for t in (codes, active, forced, f_text, f_audio))


def lm_state(gen: LMGen) -> list[torch.Tensor]:
    """Every state tensor of the generator, row first."""
    cache = gen.cache
    return [
        gen.tokens,
        gen.temperature,
        gen.top_k,
        gen.seed_lo,
        gen.seed_hi,
        *cache.tensors(),
        *gen.dep_scratch.buffers,
    ]


def lm_planted_step(gen: LMGen) -> Callable[..., tuple[torch.Tensor, ...]]:
    """A planted mistake: the attention span taken from the host mirror of the step
    counters (a Python int, right for an eager step) instead of the full ring."""
    cfg = gen.lm.config

    def step(*inputs):
        b = inputs[0].shape[0]
        length = min(max(h or 0 for h in gen.host_steps[:b]) + 1, cfg.context)
        return gen.core(*inputs, shape=CoreShape(length, True, cfg.text_card, cfg.card))

    return step


def lm_prefill(gen: LMGen, row: int, codes: torch.Tensor, text, audio, chunk: int) -> None:
    gen.prefill(row, codes, text, audio, chunk=chunk)


def lm_eager_step(gen: LMGen, codes: torch.Tensor, active: torch.Tensor) -> tuple:
    """The engine's eager step (host tensors in, host tensors out)."""
    r = gen.step(codes, active)
    return r.text, r.audio, r.ready, r.sampled_text, r.sampled_audio, r.steps


PROJECT_GRAPHS = cuda_graphs.BucketGraphs  # the project's own capture code


@contextlib.contextmanager
def engine_graphs(graphs: type) -> Iterator[None]:
    """Runners built inside use `graphs` where they would build `BucketGraphs`."""
    saved = row_runner.BucketGraphs
    row_runner.BucketGraphs = graphs
    try:
        yield
    finally:
        row_runner.BucketGraphs = saved


@contextlib.contextmanager
def cpu_cuda_sync() -> Iterator[None]:
    """Warm-up synchronizes CUDA after capturing; on the CPU a no-op stands in."""
    saved = torch.cuda.synchronize
    torch.cuda.synchronize = lambda device=None: None
    try:
        yield
    finally:
        torch.cuda.synchronize = saved


def lm_runner(
    lm: Any, slots: int, graphs: type | None, step: Callable[[LMGen], Callable] | None = None
) -> lm_engine.GenRunner:
    """The engine's runner over `slots` rows, every bucket warmed up (and, with `graphs`,
    captured) as at load; `step(gen)` replaces the step its graphs capture."""
    with engine_graphs(graphs or EagerBucketGraphs):
        runner = lm_engine.GenRunner(lm_generator(lm, slots), slots, graphs is not None)
    if step is not None:
        planted = step(runner.gen)
        runner.graphs.step = lambda shape, *inputs: planted(*inputs)
    for b in runner.ladder:
        runner.warm_up(b)
    return runner


def lm_tick(runner: lm_engine.GenRunner, frames: dict[int, dict]) -> list[tuple]:
    """One tick: `frames[slot]` is {"codes"} or {"codes", "text", "audio"} (forced) or
    {"prefill": (codes, text, audio)}; returns (ready, text, audio) per slot, in order."""
    payloads = []
    for f in frames.values():
        if "prefill" in f:
            payloads.append(lm_engine.Start(replay=lm_engine.Prefill(*f["prefill"])))
        else:
            payloads.append(lm_engine.StepInput(f["codes"], f.get("text"), f.get("audio")))
    results, _ = runner.run(list(frames), payloads)
    out = []
    for slot, r in zip(frames, results):
        while r is DEFERRED:  # the scheduler would tick again until the prefill is done
            (r,), _ = runner.run([slot], [payloads[list(frames).index(slot)]])
        out.append(("started", r.prompt_frames) if isinstance(r, lm_engine.StartDone) else r)
    return [
        (r.ready, r.text, list(r.audio)) if isinstance(r, lm_engine.StepOut) else r for r in out
    ]


def lm_live_rows(runner: lm_engine.GenRunner) -> int:
    """Rows [0, live) hold sessions; the others are free (garbage until a join resets them:
    the warm-up leaves them with random seeds)."""
    return runner.table.live


def lm_join_slot(runner: lm_engine.GenRunner, slot: int, sampling, seed: int) -> None:
    runner.join(slot, lm_engine.JoinPayload(sampling, seed))


def lm_leave_slot(runner: lm_engine.GenRunner, slot: int) -> None:
    runner.leave(slot)


def ladder(slots: int) -> tuple[int, ...]:
    return bucket_ladder(slots)


def mimi_streamers(mimi: Any, rows: int) -> tuple[Any, Any]:
    return mimi.streaming_encoder(rows), mimi.streaming_decoder(rows)


def mimi_step(streamer: Any, x: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
    """The step a CUDA graph captures (`StreamerRunner`)."""
    return streamer.step_unchecked(x, active)


def mimi_state(streamer: Any) -> list[torch.Tensor]:
    cache = streamer._cache
    return [*streamer._states, *cache.tensors()]


class _PlantedCodecRunner(codec_engine.StreamerRunner):
    """A planted mistake: the step builds its row mask from the host's plan of the tick
    (a tensor made from host data inside the step) instead of taking it as an input."""

    host_rows: list[int] | None = None

    def run(self, slots, payloads):
        self.host_rows = self.table.plan(slots).rows
        return super().run(slots, payloads)

    def step(self, masked, x, active=None):
        b = x.shape[0]
        rows = range(b) if self.host_rows is None else self.host_rows
        mask = torch.tensor([r in rows for r in range(b)], device=x.device)
        return (self.streamer.step_unchecked(x, mask),)


def codec_runners(mimi: Any, slots: int, graphs: type | None, planted: bool = False) -> tuple:
    """The codec engine's encode and decode runners, every bucket warmed up (and, with
    `graphs`, captured) as at load."""
    cls = _PlantedCodecRunner if planted else codec_engine.StreamerRunner
    enc, dec = mimi_streamers(mimi, slots)
    with engine_graphs(graphs or EagerBucketGraphs):
        runners = (
            cls(enc, slots, (FRAME,), torch.float32, graphs=graphs is not None),
            cls(dec, slots, (mimi.num_codebooks,), torch.long, graphs=graphs is not None),
        )
    for runner in runners:
        for b in runner.ladder:
            runner.warm_up(b)
    return runners


def codec_tick(runners: tuple, slots: list[int], pcm: list[torch.Tensor]) -> tuple:
    enc, dec = runners
    codes, _ = enc.run(slots, pcm)
    wav, _ = dec.run(slots, codes)
    return torch.stack(codes), torch.stack(wav)


def codec_join(runners: tuple, slot: int) -> None:
    for r in runners:
        r.join(slot, None)


def codec_leave(runners: tuple, slot: int) -> None:
    for r in runners:
        r.leave(slot)


def codec_state(runners: tuple) -> list[torch.Tensor]:
    return [t for r in runners for t in mimi_state(r.streamer)]


def engines_on(device: str, slots: int, cpu_forms: str = "auto") -> tuple[Any, Any]:
    """The LM and codec engines as `moshi-grpc lm|codec --device DEVICE` builds them
    (tiny presets, random weights): loaded, every bucket warmed up and captured."""
    common = dict(
        config="tiny", device=device, max_sessions=slots, warmup_repeats=1, cpu_forms=cpu_forms
    )
    lm_options = lm_engine.LmOptions(**common)
    codec_options = codec_engine.CodecOptions(**common)
    lm, tokenizer = lm_engine.load_lm_model(lm_options)
    lm_eng = lm_engine.LmEngine(lm, tokenizer, lm_options)
    codec_eng = codec_engine.CodecEngine(
        codec_engine.load_codec_model(codec_options), codec_options
    )
    return lm_eng, codec_eng


def engine_tick(lm_eng: Any, codec_eng: Any, pcm: list[torch.Tensor]) -> list:
    """One frame for slots [0, len(pcm)): encode, LM step, decode, through the engines'
    runners (the schedulers' threads are not started)."""
    slots = list(range(len(pcm)))
    enc, dec = codec_eng.encoder.runner, codec_eng.decoder.runner
    codes, _ = enc.run(slots, pcm)
    user = [c[: lm_eng.n_user] % lm_eng.card for c in codes]  # (the tiny LM has 64 codes)
    steps, _ = lm_eng.runner.run(slots, [lm_engine.StepInput(u) for u in user])
    wav, _ = dec.run(slots, [c for c in codes])
    return [*codes, *wav, *[(s.ready, s.text, list(s.audio)) for s in steps]]


def engines_join(lm_eng: Any, codec_eng: Any, slots: int) -> None:
    for s in range(slots):
        lm_join_slot(lm_eng.runner, s, SamplingConfig(), seed=s)
        codec_eng.encoder.runner.join(s, None)
        codec_eng.decoder.runner.join(s, None)


# ==== 1. placement and host syncs on a virtual CUDA device ==================================


@pytest.fixture(scope="module")
def small_lm() -> tuple[Any, Any]:
    """The moshiko-shaped "small" preset on virtual CUDA and on the CPU (same weights)."""
    _virtual_device()
    with VirtualCuda():
        on_cuda = load_lm(None, "small", device=MODEL_DEVICE, seed=3)
    return on_cuda, load_lm(None, "small", seed=3)


def _virtual_device() -> None:
    if not CPU_BUILD:
        pytest.skip("a CPU build of torch (on a CUDA build the gpu-marked tests run)")


def _host(tree: Any) -> Any:
    return [t.cpu() for t in tree]


def test_small_preset_is_moshiko_shaped(small_lm) -> None:
    cfg = small_lm[0].config
    assert (cfg.text_card, cfg.card, cfg.n_q, cfg.dep_q) == (32000, 2048, 16, 8)
    assert small_lm[0].device == torch.device(MODEL_DEVICE)


def test_lm_step_of_every_bucket_runs_on_cuda_with_no_host_sync(small_lm) -> None:
    """Each bucket's captured step (widest shape: every candidate of 32,000 text and 2,048
    audio tokens, the full 3,000-step span, masked and forced rows) in strict mode on the
    virtual device equals the same step on the CPU; so does the state it leaves."""
    on_cuda, on_cpu = small_lm
    cfg = on_cpu.config
    g = torch.Generator().manual_seed(0)
    with VirtualCuda() as vc:
        gens = lm_generator(on_cuda, SLOTS), lm_generator(on_cpu, SLOTS)
        for gen in gens:
            for row in range(SLOTS):
                lm_join(gen, row, SAMPLINGS[row % len(SAMPLINGS)], seed=row)
        steps = [lm_captured_step(gen) for gen in gens]
        for b in ladder(SLOTS):
            codes = torch.randint(0, cfg.card, (b, cfg.num_user_streams), generator=g)
            active = torch.arange(b) % 3 != 1 if b > 1 else torch.ones(1, dtype=torch.bool)
            inputs = [lm_step_inputs(gen, codes, active) for gen in gens]
            with torch.inference_mode(), vc.strict():
                out = steps[0](*inputs[0])
            assert all(t.device == torch.device(MODEL_DEVICE) for t in out)
            with torch.inference_mode():
                want = steps[1](*inputs[1])
            for got, exp in zip(_host(out), want, strict=True):
                assert torch.equal(got, exp), b
        for got, exp in zip(_host(lm_state(gens[0])), lm_state(gens[1]), strict=True):
            assert torch.equal(got, exp)


def test_lm_prefill_then_steps_run_on_cuda(small_lm) -> None:
    """A failover prefill (several chunks) is not captured: host reads are allowed, device
    mixing is not; the captured step after it runs strict; the engine's eager step moves
    its host inputs and outputs. All equal the CPU."""
    on_cuda, on_cpu = small_lm
    cfg = on_cpu.config
    g = torch.Generator().manual_seed(1)
    total = 40
    user = torch.randint(0, cfg.card, (total, cfg.num_user_streams), generator=g)
    text = torch.randint(0, cfg.text_card, (total,), generator=g)
    audio = torch.randint(0, cfg.card, (total, cfg.dep_q), generator=g)
    active = torch.tensor([False, True, True, False])
    codes = torch.randint(0, cfg.card, (4, cfg.num_user_streams), generator=g)
    outs = []
    with VirtualCuda() as vc:
        for lm in (on_cuda, on_cpu):
            gen = lm_generator(lm, 4)
            lm_join(gen, 1, SamplingConfig(), seed=5)
            lm_join(gen, 2, SamplingConfig.greedy(), seed=6)
            lm_prefill(gen, 2, user, text, audio, chunk=16)
            inputs = lm_step_inputs(gen, codes, active)
            with torch.inference_mode(), contextlib.ExitStack() as stack:
                if lm is on_cuda:
                    stack.enter_context(vc.strict())
                captured = lm_captured_step(gen)(*inputs)
            eager = lm_eager_step(gen, codes, active)
            outs.append(_host([*captured, *eager, *lm_state(gen)]))
    for got, exp in zip(*outs, strict=True):
        assert torch.equal(got, exp)


@pytest.fixture(scope="module")
def tiny_mimi() -> tuple[Any, Any]:
    _virtual_device()
    with VirtualCuda():
        on_cuda = load_mimi(None, config="tiny", device=MODEL_DEVICE)
    return on_cuda, load_mimi(None, config="tiny")


def test_mimi_steps_of_every_bucket_run_on_cuda_with_no_host_sync(tiny_mimi) -> None:
    """Encode then decode, unmasked and masked, every bucket, strict; equal to the CPU."""
    on_cuda, on_cpu = tiny_mimi
    g = torch.Generator().manual_seed(2)
    with VirtualCuda() as vc:
        streamers = mimi_streamers(on_cuda, SLOTS), mimi_streamers(on_cpu, SLOTS)
        for b in ladder(SLOTS):
            pcm = 0.1 * torch.randn(b, FRAME, generator=g)
            for active in (None, torch.arange(b) % 2 == 0):
                outs = []
                for (enc, dec), dev in zip(streamers, (MODEL_DEVICE, "cpu"), strict=True):
                    mask = None if active is None else active.to(dev)
                    x = pcm.to(dev)
                    with torch.inference_mode(), contextlib.ExitStack() as stack:
                        if dev != "cpu":
                            stack.enter_context(vc.strict())
                        codes = mimi_step(enc, x, mask)
                        wav = mimi_step(dec, codes, mask)
                    assert codes.device == wav.device == torch.device(dev)
                    outs.append(_host([codes, wav]))
                for got, exp in zip(*outs, strict=True):
                    assert torch.equal(got, exp), (b, active)
        for enc_dec in zip(*streamers, strict=True):
            for got, exp in zip(_host(mimi_state(enc_dec[0])), mimi_state(enc_dec[1])):
                assert torch.equal(got, exp)


@pytest.mark.parametrize("graphs", ["eager", "graphs"])
def test_codec_runners_tick_on_cuda(tiny_mimi, graphs) -> None:
    """The codec engine's runners on the virtual device, eager or capturing every bucket
    at warm-up (recorded and replayed in strict mode), tick like the CPU's eager runners:
    their host plumbing mixes no devices and their captured steps read nothing back."""
    outs = []
    with VirtualCuda() as vc:
        for mimi in tiny_mimi:
            on_cuda = mimi is tiny_mimi[0] and graphs == "graphs"
            runners = codec_runners(
                mimi, 4, partial(EmulatedBucketGraphs, strict=vc) if on_cuda else None
            )
            for s in (0, 1, 2):
                codec_join(runners, s)
            g = torch.Generator().manual_seed(3)
            got = []
            for tick in range(3):
                slots = [0, 2] if tick == 1 else [0, 1, 2]  # slot 1 idles: masked
                pcm = [0.1 * torch.randn(FRAME, generator=g) for _ in slots]
                got += codec_tick(runners, slots, pcm)
            outs.append(got)
    for got, exp in zip(*outs, strict=True):
        assert torch.equal(got, exp)


def test_lm_runner_captures_and_replays_on_cuda(tiny_lm_on_cuda, tiny_lm) -> None:
    """The LM engine's runner on the virtual device capturing every bucket at warm-up
    (recorded and replayed in strict mode) ticks like an eager runner on the CPU."""
    script = _lm_script(tiny_lm, 6, slots=2)
    outs = []
    with VirtualCuda() as vc:
        for lm in (tiny_lm_on_cuda, tiny_lm):
            if lm is tiny_lm_on_cuda:
                runner = lm_runner(lm, 2, partial(EmulatedBucketGraphs, strict=vc))
            else:
                with cpu_cuda_sync():
                    runner = lm_runner(lm, 2, EagerBucketGraphs)
            got = []
            for joins, leaves, frames in script:
                for slot, sampling, seed in joins:
                    lm_join_slot(runner, slot, sampling, seed)
                for slot in leaves:
                    lm_leave_slot(runner, slot)
                got.append(lm_tick(runner, frames) if frames else [])
            outs.append(got)
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_engines_load_warm_up_and_tick_on_cuda() -> None:
    """`lm` and `codec` engines as built for `--device cuda:1` (graphs on by default, every
    bucket captured at load in strict mode) tick like the plain engines on the CPU, bit for
    bit: with `--cpu-forms auto` (the default) nothing of the CPU forms applies off the
    CPU."""
    _virtual_device()
    g = torch.Generator().manual_seed(6)
    pcm = [[0.1 * torch.randn(FRAME, generator=g) for _ in range(2)] for _ in range(3)]
    outs = []
    with VirtualCuda() as vc:
        with engine_graphs(partial(EmulatedBucketGraphs, strict=vc)):
            on_cuda = engines_on(MODEL_DEVICE, 2)
        assert on_cuda[0].runner.graphs is not None and on_cuda[1].graphs
        assert on_cuda[0].lm.device == torch.device(MODEL_DEVICE)
        with cpu_cuda_sync(), engine_graphs(EagerBucketGraphs):
            on_cpu = engines_on("cpu", 2, cpu_forms="off")
        for lm_eng, codec_eng in (on_cuda, on_cpu):
            engines_join(lm_eng, codec_eng, 2)
            outs.append([x for frame in pcm for x in engine_tick(lm_eng, codec_eng, frame)])
    for got, exp in zip(*outs, strict=True):
        assert got == exp if isinstance(got, tuple) else torch.equal(got, exp)


# ==== 2. graph semantics: capture once, replay for many ticks ===============================


@pytest.fixture(scope="module")
def tiny_lm() -> Any:
    """Tiny vocabularies and a 16-step context: 40 ticks wrap the KV ring."""
    return load_lm(None, "tiny", seed=4)


def _lm_script(lm: Any, ticks: int, slots: int = SLOTS) -> list[tuple[list, list, dict]]:
    """Per tick: (joins [(slot, sampling, seed)], leaves [slot], frames {slot: frame}).

    One slot lives throughout (greedy) and steps most ticks: it wraps the ring. Others join
    and leave at random (rows move), idle at random (masked rows), are forced some ticks;
    at tick 3 one joins with a prefill of 20 recorded steps."""
    cfg = lm.config
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    keep = min(5, slots - 1)

    def codes():
        return torch.randint(0, cfg.card, (cfg.num_user_streams,), generator=g)

    live = [keep]
    script = [([(keep, SamplingConfig.greedy(), 50)], [], {})]
    for tick in range(1, ticks):
        joins, leaves = [], []
        free = [s for s in range(slots) if s not in live]
        if free and len(live) < 6 and (tick == 3 or rng.random() < 0.35):
            joins.append((rng.choice(free), SAMPLINGS[rng.randrange(2)], 100 + tick))
        if len(live) > 2 and rng.random() < 0.2:
            leaves.append(rng.choice([s for s in live if s != keep]))
        live = [s for s in live if s not in leaves] + [j[0] for j in joins]
        frames: dict[int, dict] = {}
        for s in live:
            if tick == 3 and joins and s == joins[0][0]:
                hist = 20  # > the tiny context: the prefill wraps the ring
                frames[s] = {
                    "prefill": (
                        torch.randint(0, cfg.card, (hist, cfg.num_user_streams), generator=g),
                        torch.randint(0, cfg.text_card, (hist,), generator=g),
                        torch.randint(0, cfg.card, (hist, cfg.dep_q), generator=g),
                    )
                }
            elif rng.random() < (0.9 if s == keep else 0.7):
                frame = {"codes": codes()}
                if s != keep and rng.random() < 0.2:
                    frame["text"] = int(torch.randint(0, cfg.text_card, (), generator=g))
                    frame["audio"] = torch.randint(0, cfg.card, (cfg.dep_q,), generator=g)
                frames[s] = frame
        script.append((joins, leaves, frames))
    return script


def _lm_divergence(a: Any, b: Any, ticks: int, state: bool = True) -> list[str]:
    """Drive runners `a` and `b` through the same script; the ticks where their outputs
    (or, with `state`, the whole state of every live row) differ."""
    diverged = []
    for tick, (joins, leaves, frames) in enumerate(_lm_script(a.gen.lm, ticks)):
        outs = []
        for runner in (a, b):
            for slot, sampling, seed in joins:
                lm_join_slot(runner, slot, sampling, seed)
            for slot in leaves:
                lm_leave_slot(runner, slot)
            outs.append(lm_tick(runner, frames) if frames else [])
        live = lm_live_rows(a)
        assert live == lm_live_rows(b)
        if outs[0] != outs[1]:
            diverged.append(f"tick {tick}: outputs")
        elif state and not all(
            torch.equal(x[:live], y[:live])
            for x, y in zip(lm_state(a.gen), lm_state(b.gen), strict=True)
        ):
            diverged.append(f"tick {tick}: state")
    return diverged


def test_lm_replayed_graphs_equal_eager_tick_by_tick(tiny_lm) -> None:
    script = _lm_script(tiny_lm, 40)
    frames = [f for _, _, tick in script for f in tick.values()]
    assert sum(5 in tick for _, _, tick in script) > tiny_lm.config.context  # the ring wraps
    assert any(leaves for _, leaves, _ in script) and any(joins for joins, _, _ in script)
    assert any("prefill" in f for f in frames) and any("text" in f for f in frames)
    with cpu_cuda_sync():
        replayed = lm_runner(tiny_lm, SLOTS, EmulatedBucketGraphs)
        eager = lm_runner(tiny_lm, SLOTS, EagerBucketGraphs)
    assert _lm_divergence(replayed, eager, 40) == []


def test_lm_host_value_baked_into_a_capture_goes_stale(tiny_lm) -> None:
    """The planted span gives the right tokens eagerly, and goes stale once captured: the
    replay attends over the span the rows had at warm-up."""
    with cpu_cuda_sync():
        sound = lm_runner(tiny_lm, SLOTS, EagerBucketGraphs)
        planted = [
            lm_runner(tiny_lm, SLOTS, graphs, step=lm_planted_step)
            for graphs in (EagerBucketGraphs, EagerBucketGraphs, EmulatedBucketGraphs)
        ]
    assert _lm_divergence(planted[0], sound, 12, state=False) == []
    assert _lm_divergence(planted[2], planted[1], 12)


def _codec_script(ticks: int) -> list[tuple[list, list, list]]:
    """Per tick: (joins, leaves, slots with a frame). Slot 3 lives throughout; others join,
    leave (rows move) and idle (masked rows); 16 ticks wrap the tiny ring."""
    rng = random.Random(1)
    live, script = [], []
    for tick in range(ticks):
        joins = [3, 0, 7] if tick == 0 else []
        if tick and len(live) < 6 and rng.random() < 0.3:
            joins = [rng.choice([s for s in range(SLOTS) if s not in live])]
        leaves = [rng.choice([s for s in live if s != 3])] if tick % 5 == 4 else []
        live = [s for s in live if s not in leaves] + joins
        stepping = [s for s in live if s == 3 or rng.random() < 0.6]
        script.append((joins, leaves, sorted(stepping)))
    return script


def _codec_divergence(a: tuple, b: tuple, state: bool = True) -> list[str]:
    """Drive two pairs of codec runners through the same script; the ticks where their
    outputs (or, with `state`, their whole states) differ."""
    g = torch.Generator().manual_seed(5)
    diverged = []
    for tick, (joins, leaves, slots) in enumerate(_codec_script(16)):
        pcm = [0.1 * torch.randn(FRAME, generator=g) for _ in slots]
        outs = []
        for runners in (a, b):
            for s in leaves:
                codec_leave(runners, s)
            for s in joins:
                codec_join(runners, s)
            outs.append(codec_tick(runners, slots, pcm))
        if not all(torch.equal(x, y) for x, y in zip(*outs, strict=True)):
            diverged.append(f"tick {tick}: outputs")
        elif state and not all(
            torch.equal(x, y) for x, y in zip(codec_state(a), codec_state(b), strict=True)
        ):
            diverged.append(f"tick {tick}: state")
    return diverged


def test_mimi_replayed_graphs_equal_eager_tick_by_tick() -> None:
    mimi = load_mimi(None, config="tiny")
    script = _codec_script(16)
    assert any(leaves for _, leaves, _ in script)
    assert any(set(s) != set(range(max(s) + 1)) for _, _, s in script)  # idle rows below
    assert 16 * 2 > mimi.config.context + 1  # 25 Hz steps of slot 3 wrap its ring
    replayed = codec_runners(mimi, SLOTS, EmulatedBucketGraphs)
    eager = codec_runners(mimi, SLOTS, EagerBucketGraphs)
    assert _codec_divergence(replayed, eager) == []


def test_mimi_host_mask_baked_into_a_capture_goes_stale() -> None:
    """The planted row mask gives the right codes and pcm eagerly, and goes stale once
    captured (the warm-up's mask, every row on): idle rows advance under replay."""
    mimi = load_mimi(None, config="tiny")
    sound = codec_runners(mimi, SLOTS, None)
    planted = [
        codec_runners(mimi, SLOTS, graphs, planted=True)
        for graphs in (None, None, EmulatedBucketGraphs)
    ]
    assert _codec_divergence(planted[0], sound, state=False) == []
    assert _codec_divergence(planted[2], planted[1])


# ==== 3. defects of today's code that a GPU would show =====================================


@pytest.fixture(scope="module")
def tiny_lm_on_cuda() -> Any:
    _virtual_device()
    with VirtualCuda():
        return load_lm(None, "tiny", device=MODEL_DEVICE, seed=4)


def _project_graphs_tick(lm_device: str, mimi_device: str) -> None:
    """The runners with the project's `BucketGraphs` (capturing through the `torch.cuda`
    stand-ins of the virtual device: strict, one device per capture) tick like eager CPU
    runners."""
    _virtual_device()
    g = torch.Generator().manual_seed(7)
    pcm = [[0.1 * torch.randn(FRAME, generator=g) for _ in range(2)] for _ in range(3)]
    outs = []
    with VirtualCuda():
        for lm_dev, mimi_dev, graphs in (
            (lm_device, mimi_device, PROJECT_GRAPHS),
            ("cpu",) * 2 + (None,),
        ):
            lm = load_lm(None, "tiny", device=lm_dev, seed=4)
            mimi = load_mimi(None, config="tiny", device=mimi_dev)
            with cpu_cuda_sync() if lm_dev == "cpu" else contextlib.nullcontext():
                lm_run = lm_runner(lm, 2, graphs or EagerBucketGraphs)
            codec = codec_runners(mimi, 2, graphs)
            for s in (0, 1):
                lm_join_slot(lm_run, s, SAMPLINGS[s], seed=s)
                codec_join(codec, s)
            got = []
            for frame in pcm:
                codes, wav = codec_tick(codec, [0, 1], frame)
                user = {
                    s: {"codes": codes[s, : lm.config.num_user_streams] % lm.config.card}
                    for s in (0, 1)
                }
                got += [codes, wav, lm_tick(lm_run, user)]
            outs.append(got)
    for got, exp in zip(*outs, strict=True):
        assert got == exp if isinstance(got, list) else torch.equal(got, exp)


def test_project_bucket_graphs_capture_and_replay_on_cuda() -> None:
    """Models on the current device (cuda:0): the project's capture code is sound."""
    _project_graphs_tick("cuda:0", "cuda:0")


def test_project_bucket_graphs_capture_a_model_on_another_device() -> None:
    """Models on cuda:1 while cuda:0 is current (issue 20 defect 2, fixed): the capture and
    the replay run under the model's device, so the graph holds the step."""
    _project_graphs_tick(MODEL_DEVICE, MODEL_DEVICE)


@pytest.mark.parametrize("graphs", [None, EagerBucketGraphs], ids=["eager", "graphs"])
def test_warm_up_times_a_step_bracketed_by_syncs_of_the_models_device(
    tiny_lm_on_cuda, tiny_mimi, graphs
) -> None:
    """Issue 20 defects 2 and 4 (fixed): every warm-up (eager or captured, LM and codec)
    synchronizes the model's device (cuda:1, not the current cuda:0) before its clock
    starts and before it stops, so `warm_ms` is the step's time, not its launches."""
    with VirtualCuda() as vc:
        runner = lm_runner(tiny_lm_on_cuda, 2, graphs=graphs)
    assert (runner.graphs is None) == (graphs is None)
    with VirtualCuda() as codec_vc:
        enc, dec = codec_runners(tiny_mimi[0], 2, graphs)
    model = torch.device(MODEL_DEVICE)
    # two per bucket (before and after the timed step), one after the prefill's probe chunk
    assert vc.synchronized == [model] * (2 * len(runner.ladder) + 1)
    shapes = sum(len(r.warm_shapes(b)) for r in (enc, dec) for b in r.ladder)
    assert codec_vc.synchronized == [model] * 2 * shapes
