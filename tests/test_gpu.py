"""The LM's CUDA paths at real sizes: run by `tools/gpu_check.sh` on a GPU machine.

The gpu-marked tests need CUDA and are skipped without it. They use the real vocabularies
(text 32,000, audio 2,048: top-k over 32,000 candidates is another kernel than over 2,048,
and a captured graph samples over the whole vocabulary), bfloat16, a ring KV cache that
wraps, forced tokens and prefill (failover replay), and buckets of several sizes, and check:
graphs == the same computation eagerly; the eager step the service runs without graphs ==
that computation (logits bit for bit); a session's tokens do not
depend on its bucket; a replayed session continues exactly; the memory plan's bytes are
what CUDA allocates.

Every test body also runs on CPU (not gpu-marked; captured graphs replaced by the same
computation run eagerly), so that the bodies are known to work before a GPU first runs
them. The generator and graph API is used through one adapter, `Gen`: the one place to
update when that API changes.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from moshi_grpc.models.lm import PRESETS, load_lm
from moshi_grpc.models.lm_gen import LMGen, SamplingConfig, StepResult
from moshi_grpc.models.memory_plan import lm_memory

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
# Real vocabularies, tiny dimensions, an 8-step context: 14 steps wrap the ring.
CONFIG = dict(PRESETS["small"], context=8)
STEPS = 14
MODES = ("eager", "eager-full", "graphs")
SAMPLINGS = [
    SamplingConfig(),  # the defaults: top-k 25 text, 250 audio
    SamplingConfig.greedy(),
    SamplingConfig(1.0, 0, 1.0, 0),  # the whole vocabulary: top-k over 32,000 and 2,048
    SamplingConfig(0.9, 100, 0.7, 2048),
]


class Gen:
    """Today's generator and graph API (`LMGen`, `core`, `full_shape`, `BucketGraphs`)
    behind the calls these tests make. `mode`: "eager" (the service's eager step,
    `core_shape`), "eager-full" (the captured computation, `full_shape`, run eagerly) or
    "graphs" (captured per bucket and replayed; on CPU, eager-full stands in)."""

    def __init__(self, lm, rows: int, mode: str) -> None:
        self.gen = LMGen(lm, rows)
        self.device = lm.device
        self.mode = mode
        self.graphs = None
        if mode == "graphs" and self.device.type == "cuda":
            from moshi_grpc.services.common.cuda_graphs import BucketGraphs

            gen = self.gen
            self.graphs = BucketGraphs(lambda shape, *x: gen.core(*x, shape=shape), self.device)

    def _inputs(self, b: int, codes, active, forced: dict | None) -> tuple:
        cfg = self.gen.lm.config
        if active is None:
            active = torch.ones(b, dtype=torch.bool)
        force = torch.zeros(b, dtype=torch.bool)
        text = torch.zeros(b, dtype=torch.long)
        audio = torch.zeros((b, cfg.dep_q), dtype=torch.long)
        for row, (t, a) in (forced or {}).items():
            force[row], text[row], audio[row] = True, t, torch.as_tensor(a)
        return tuple(x.to(self.device) for x in (codes, active, force, text, audio))

    def capture(self, *buckets: int) -> None:
        """Capture these buckets (before any session starts: a capture steps the rows)."""
        if self.graphs is None:
            return
        for b in buckets:
            codes = torch.zeros((b, self.gen.lm.config.num_user_streams), dtype=torch.long)
            self.graphs.capture(b, self.gen.full_shape(), self._inputs(b, codes, None, None))

    def start(self, row: int, sampling: SamplingConfig, seed: int) -> None:
        self.gen.reset(row, sampling, seed)

    def step(self, codes, active=None, forced: dict | None = None) -> StepResult:
        """One step of rows [0, len(codes)); `forced`: row -> (text, audio) to force."""
        b = codes.shape[0]
        gen = self.gen
        if self.mode == "eager":
            if not forced:
                return gen.step(codes, active)
            _, _, force, text, audio = self._inputs(b, codes, active, forced)
            return gen.step(codes, active, force_text=text, force_audio=audio, force=force)
        inputs = self._inputs(b, codes, active, forced)
        if self.graphs is not None:
            assert b in self.graphs, f"bucket {b} was not captured"
            out = self.graphs.run(b, inputs)
        else:  # the captured computation, run eagerly
            with torch.inference_mode():
                out = gen.core(*inputs, shape=gen.full_shape())
        gen.advance(inputs[1].nonzero()[:, 0].tolist())
        return StepResult(*(t.cpu() for t in out))

    def prefill(self, row: int, codes, text, audio, chunk: int) -> None:
        self.gen.prefill(row, codes, text, audio, chunk)

    def record_logits(self) -> list[torch.Tensor]:
        """From now on, the logits of every sampled stream (text, then each codebook) of
        every eager step, in order. Eager modes only: a replay runs no Python."""
        seen: list[torch.Tensor] = []
        sample = self.gen._sample

        def recording(logits, stream, step, kmax):
            seen.append(logits.detach().float().cpu())
            return sample(logits, stream, step, kmax)

        self.gen._sample = recording
        return seen


def _frames(r: StepResult, row: int) -> tuple:
    return (bool(r.ready[row]), int(r.text[row]), tuple(r.audio[row].tolist()))


def _codes(steps: int, rows: int, seed: int) -> torch.Tensor:
    cfg = CONFIG
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg["card"], (steps, rows, cfg["n_q"] - cfg["dep_q"]), generator=g)


_MODELS: dict = {}


def _lm(device: str, dtype: torch.dtype):
    key = (device, dtype)
    if key not in _MODELS:
        _MODELS[key] = load_lm(None, CONFIG, device=device, dtype=dtype, seed=3)
    return _MODELS[key]


@pytest.fixture
def exact_float32():
    """float32 means float32 on CUDA too: TF32 off for these tests, then restored."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---- the test bodies (device, dtype) -------------------------------------------------------


def _run_modes(device: str, dtype, modes: tuple[str, ...], rows: int = 4) -> dict[str, list]:
    """Every mode steps the same sessions (mixed sampling, one idle every third step) for
    STEPS steps (the ring wraps): each step's frames and sampled tokens per mode."""
    lm = _lm(device, dtype)
    codes = _codes(STEPS, rows, seed=1)
    out: dict[str, list] = {}
    for mode in modes:
        gen = Gen(lm, rows, mode)
        gen.capture(rows)
        for row in range(rows):
            gen.start(row, SAMPLINGS[row % len(SAMPLINGS)], seed=100 + row)
        seen = []
        for t in range(STEPS):
            active = torch.ones(rows, dtype=torch.bool)
            active[t % rows] = t % 3 != 0  # an idle (masked) row now and then
            r = gen.step(codes[t], active)
            seen.append([r.text, r.audio, r.ready, r.sampled_text, r.sampled_audio, r.steps])
        out[mode] = seen
    return out


def _assert_same_steps(a: list, b: list) -> None:
    for t, (x, y) in enumerate(zip(a, b, strict=True)):
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            assert torch.equal(u, v), f"step {t}, output {i}: {u.tolist()} != {v.tolist()}"


def check_graphs_equal_the_same_computation_eagerly(device: str, dtype) -> None:
    seen = _run_modes(device, dtype, ("eager-full", "graphs"))
    _assert_same_steps(seen["eager-full"], seen["graphs"])
    assert int(seen["graphs"][-1][5].max()) > CONFIG["context"]  # the ring wrapped


def check_served_eager_logits_equal_the_captured(device: str, dtype) -> None:
    """The eager step the service runs without graphs computes the logits of the captured
    computation (run eagerly: a replay runs no Python to record them), bit for bit; greedy
    sessions, so that both follow the same tokens."""
    lm = _lm(device, dtype)
    rows = 3
    codes = _codes(STEPS, rows, seed=4)
    logits = {}
    for mode in ("eager", "eager-full"):
        gen = Gen(lm, rows, mode)
        for row in range(rows):
            gen.start(row, SamplingConfig.greedy(), seed=row)
        logits[mode] = gen.record_logits()
        for t in range(STEPS):
            gen.step(codes[t])
    assert len(logits["eager"]) == len(logits["eager-full"]) == STEPS * (1 + CONFIG["dep_q"])
    for i, (a, b) in enumerate(zip(logits["eager"], logits["eager-full"], strict=True)):
        assert torch.equal(a, b), f"step {i // 9}, stream {i % 9}: max |diff| {(a - b).abs().max()}"


def check_tokens_do_not_depend_on_the_bucket(device: str, dtype) -> None:
    """Row 0's session alone in bucket 1, then among neighbours in bucket 4 (graphs)."""
    lm = _lm(device, dtype)
    codes = _codes(STEPS, 4, seed=2)
    runs = []
    for rows in (1, 4):
        gen = Gen(lm, 4, "graphs")
        gen.capture(rows)
        for row in range(rows):
            gen.start(row, SAMPLINGS[row], seed=7 if row == 0 else 50 + row)
        runs.append([_frames(gen.step(codes[t, :rows]), 0) for t in range(STEPS)])
    assert runs[0] == runs[1]


def check_replay_continues_the_session(device: str, dtype, prefill: bool) -> None:
    """A session (seed 7) runs CUT steps; a row of another generator replays its history
    by forced tokens (or by prefill) and must then continue with the same frames. A row
    forced with another seed samples nothing of its own while forced."""
    lm = _lm(device, dtype)
    cut, rows = 10, 3  # cut > context: the replayed history wraps the ring
    codes = _codes(STEPS, 1, seed=3)[:, 0]
    orig = Gen(lm, 1, "graphs")
    orig.capture(1)
    orig.start(0, SamplingConfig(), seed=7)
    history, frames = [], []
    for t in range(STEPS):
        r = orig.step(codes[t][None])
        history.append((int(r.sampled_text[0]), r.sampled_audio[0].clone()))
        frames.append(_frames(r, 0))
    gen = Gen(lm, rows, "graphs")
    gen.capture(rows)
    gen.start(1, SamplingConfig(), seed=7)  # the replay
    gen.start(2, SamplingConfig(), seed=8)  # forced too, with another seed
    user = torch.zeros((rows, codes.shape[1]), dtype=torch.long)
    if prefill:
        text = torch.tensor([h[0] for h in history[:cut]])
        audio = torch.stack([h[1] for h in history[:cut]])
        gen.prefill(1, codes[:cut], text, audio, chunk=8)
    for t in range(cut if prefill else 0, STEPS):
        user[1] = user[2] = codes[t]
        replaying = t < cut
        forced = {2: history[t]} if replaying else {}
        if replaying and not prefill:
            forced[1] = history[t]
        active = torch.tensor([False, True, replaying])
        r = gen.step(user, active, forced)
        assert _frames(r, 1) == frames[t], t
        if replaying:
            assert int(r.sampled_text[2]) == history[t][0], t


def check_memory_matches_the_plan(device: str, dtype) -> None:
    """What the generator's state takes on the device is the plan's per-row arithmetic
    (allocations round up to 512 bytes: a little slack per tensor)."""
    lm = _lm(device, dtype)
    plan = lm_memory(lm.config, dtype, lm.kv_dtypes)
    rows = 8
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        gen = LMGen(lm, rows)
        held = torch.cuda.memory_allocated() - before
    else:
        gen = LMGen(lm, rows)
        held = sum(t.untyped_storage().nbytes() for t in _state_tensors(gen))
    tensors = len(_state_tensors(gen)) + 16  # small constants of the generator
    assert rows * plan.per_row <= held <= rows * plan.per_row + 512 * tensors + 4096


def _state_tensors(gen: LMGen) -> list[torch.Tensor]:
    scratch = gen.dep_scratch.buffers
    small = [gen.tokens, gen.temperature, gen.top_k, gen.seed_lo, gen.seed_hi, gen._rows]
    small += [gen.pending, gen.pending_tokens, gen.user_prev]
    return [*gen.cache.k, *gen.cache.v, gen.cache.pos, gen.cache._row_ids, *scratch, *small]


# ---- on CUDA -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.usefixtures("exact_float32")
@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_equal_the_same_computation_eagerly(dtype) -> None:
    check_graphs_equal_the_same_computation_eagerly("cuda", dtype)


@pytest.mark.gpu
@needs_cuda
def test_cuda_served_eager_logits_equal_the_captured_bf16() -> None:
    check_served_eager_logits_equal_the_captured("cuda", torch.bfloat16)


@pytest.mark.gpu
@needs_cuda
def test_cuda_tokens_do_not_depend_on_the_bucket_bf16() -> None:
    check_tokens_do_not_depend_on_the_bucket("cuda", torch.bfloat16)


@pytest.mark.gpu
@needs_cuda
def test_cuda_forced_replay_continues_the_session_bf16() -> None:
    check_replay_continues_the_session("cuda", torch.bfloat16, prefill=False)


@pytest.mark.usefixtures("exact_float32")
@pytest.mark.gpu
@needs_cuda
def test_cuda_prefill_replay_continues_the_session_fp32() -> None:
    check_replay_continues_the_session("cuda", torch.float32, prefill=True)


@pytest.mark.gpu
@needs_cuda
def test_cuda_memory_matches_the_plan_bf16() -> None:
    check_memory_matches_the_plan("cuda", torch.bfloat16)


@pytest.mark.gpu
@needs_cuda
def test_bench_gpu_runs_every_mode_on_cuda(capsys) -> None:
    """The benchmark's CUDA paths (device-side weights and cache fill, capture, memory per
    bucket, the search) on small models, before the 7B run."""
    from moshi_grpc.bench import gpu

    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    args = parser.parse_args(
        ["--lm-config", "small", "--mimi-config", "tiny", "--sessions", "1,2", "--steps", "3"]
        + ["--search-max", "4", "--budget-ms", "1000000"]
    )
    assert gpu.run(args) == 0
    out = capsys.readouterr().out
    for mode in MODES:
        assert f"| 2 | {mode} |" in out
    assert "| 2 | " in out.split("LM capture MiB")[1]  # the memory table has the bucket
    assert "out of memory (" not in out
    assert "largest session count found by the search (graphs): 4" in out


# ---- the same bodies on CPU (graphs: the same computation, eagerly) -------------------------


@pytest.mark.slow
def test_served_eager_logits_body_on_cpu() -> None:
    check_served_eager_logits_equal_the_captured("cpu", torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize(
    "check",
    [check_tokens_do_not_depend_on_the_bucket, check_memory_matches_the_plan],
    ids=lambda f: f.__name__.removeprefix("check_"),
)
def test_bodies_on_cpu(check) -> None:
    check("cpu", torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("prefill", [False, True], ids=["forced", "prefill"])
def test_replay_body_on_cpu(prefill: bool) -> None:
    check_replay_continues_the_session("cpu", torch.float32, prefill)
