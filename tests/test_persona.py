"""Persona sessions (PersonaPlex's voice and role prompts) on the LM: parity with NVIDIA's
own implementation, batched prefill in chunks between live ticks, the prefix cache.

The golden fixture (tests/fixtures/persona, tools/make_persona_golden.py) is NVIDIA's
PersonaPlex code run greedily in float32 on CPU, on a small model in its layout (a
16-step depformer) with seeded weights that `persona_weights` rebuilds here bit for bit:
two role prompts with one voice, their session starts (every token the reference's model
consumed) and 16 live frames; and the same sessions with a 48-step context over 40 live
frames, where its ring KV cache wraps.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging

import grpc
import pytest
import torch
from safetensors.torch import save_file

from moshi_grpc.models.lm import load_lm
from moshi_grpc.models.lm_gen import LMGen, SamplingConfig
from moshi_grpc.models.persona import (
    SILENCE_TOKENS,
    PersonaError,
    persona_plan,
    wrap_prompt,
)
from moshi_grpc.models.text import TextTokenizer
from moshi_grpc.services.common.batching import DEFERRED
from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.services.lm.engine import GenRunner, JoinPayload, StartDone, StepInput
from moshi_grpc.services.lm.prefix_cache import PrefixCache
from moshi_grpc.services.lm.prompts import CHUNK, PersonaRequest, Start
from moshi_grpc.v1 import common_pb2, lm_pb2, lm_pb2_grpc

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = SamplingConfig.greedy()


@pytest.fixture(scope="module")
def golden():
    from conftest import FIXTURES, REPO_ROOT

    d = FIXTURES / "persona"
    data = json.loads((d / "golden.json").read_text())
    spec = importlib.util.spec_from_file_location(
        "make_persona_golden", REPO_ROOT / "tools" / "make_persona_golden.py"
    )
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    data["maker"] = maker
    data["config_dict"] = json.loads((d / "config.json").read_text())
    return data


@pytest.fixture(scope="module")
def weights(golden, tmp_path_factory):
    """The fixture's weights rebuilt from the seed, as a PersonaPlex `model.safetensors`."""
    maker = golden["maker"]
    state = maker.persona_weights(golden["weights"]["tensors"], golden["seed"])
    assert maker.weights_digest(state) == golden["weights"]["sha256"]
    path = tmp_path_factory.mktemp("persona") / "model.safetensors"
    save_file(state, str(path))
    return path


def _lm(golden, weights, context: int | None = None):
    cfg = dict(golden["config_dict"])
    if context is not None:
        cfg["context"] = context
    return load_lm(weights, cfg)


@pytest.fixture(scope="module")
def lm(golden, weights):
    return _lm(golden, weights)


def _voice(golden) -> torch.Tensor:
    return torch.tensor(golden["voice_codes"])


def _plan(gen: LMGen, voice: torch.Tensor, tokens: list[int]):
    cfg = gen.lm.config
    return persona_plan(
        gen.layout,
        gen.initial.cpu(),
        gen.fresh_ring(),
        voice,
        tokens,
        cfg.existing_text_padding_id,
        cfg.card,
        cfg.context,
    )


def _live(gen: LMGen, row: int, user: list[list[int]]) -> tuple[list, list]:
    text, audio = [], []
    rows = gen.num_rows
    for frame in user:
        codes = torch.zeros(rows, 8, dtype=torch.long)
        codes[row] = torch.tensor(frame)
        r = gen.step(codes, torch.arange(rows) == row)
        text.append(int(r.text[row]) if r.ready[row] else None)
        audio.append(r.audio[row].tolist() if r.ready[row] else None)
    return text, audio


# -- parity with NVIDIA's implementation ---------------------------------------------------


def test_the_fixture_is_a_persona_model_and_its_prompts_tokenize_as_the_reference(
    golden, lm
) -> None:
    assert lm.config.persona and lm.config.dep_q == 8 and lm.window == lm.config.context - 1
    tok = TextTokenizer(None)  # the bundled 4k model: the fixture's text_card
    for p in golden["prompts"]:
        assert wrap_prompt(p["text_prompt"]) == p["wrapped"]
        assert tok.encode(p["wrapped"]) == p["prompt_tokens"]
    assert wrap_prompt("  <system> as is <system> ") == "<system> as is <system>"


@pytest.mark.parametrize("prompt", [0, 1])
def test_prompted_session_matches_personaplex(golden, lm, prompt: int) -> None:
    """The prompt's prefix is what the reference's model consumed, call for call, and the
    live frames' greedy text and audio tokens are the reference's (the first is its forced
    PAD + silence frame); prefilled in chunks of 7, beside another row."""
    p = golden["prompts"][prompt]
    gen = LMGen(lm, 2)
    gen.reset(1, GREEDY, seed=0)
    plan = _plan(gen, _voice(golden), p["prompt_tokens"])
    assert plan.frames == p["prefix_calls"]
    for call in range(1, plan.frames):  # call c consumes column c - 1; call 0 runs nothing
        assert plan.prefix.columns[call - 1].tolist() == p["model_input"][call], call
    gen.load(1, plan.prefix, chunk=7)
    live = golden["user_codes"][: golden["live_frames"]]
    text, audio = _live(gen, 1, live)
    assert text == p["live_text"] and audio == p["live_audio"]
    assert text[0] == 3 and audio[0] == list(SILENCE_TOKENS)


def test_the_two_prompts_give_different_sessions(golden) -> None:
    a, b = golden["prompts"]
    assert a["live_text"] != b["live_text"] and a["live_audio"] != b["live_audio"]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", [0, 1])
def test_past_the_context_the_reference_attends_one_key_fewer(golden, weights, prompt) -> None:
    """A 48-step context and 40 live frames: the ring wraps. The reference's ring cache
    hides its oldest entry once full (`LMModel.window`); matching that rule keeps every
    token, where a context-wide window first differs at the recorded call."""
    p = golden["prompts"][prompt]
    ring = p["ring"]
    lm = _lm(golden, weights, context=48)
    gen = LMGen(lm, 1)
    gen.reset(0, GREEDY, seed=0)
    gen.load(0, _plan(gen, _voice(golden), p["prompt_tokens"]).prefix)
    text, audio = _live(gen, 0, golden["user_codes"][: len(ring["live_text"])])
    assert text == ring["live_text"] and audio == ring["live_audio"]
    assert ring["window_wide_first_differing_live_call"] < len(text)


def test_dropping_the_user_depformer_steps_leaves_moshis_tokens(golden, weights, lm) -> None:
    """A full 16-step depformer (steps 8..15 the user's, teacher-forced) and our 8 steps
    give Moshi's codebooks the same logits: the depformer is causal across steps."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from moshi_grpc.models.lm import LMModel, resolve_config

    cfg, _ = resolve_config(golden["config_dict"])
    full = LMModel(replace(cfg, dep_q=16, depformer_steps=None))  # every step built
    full.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 1, cfg.dim, generator=g)
    text = torch.randint(0, cfg.text_card, (3,), generator=g)
    user = torch.randint(0, cfg.card, (3, 8), generator=g)
    outs = {}
    with torch.inference_mode():
        for name, model, steps in (("full", full, 16), ("ours", lm, 8)):
            kv = model.new_depformer_scratch(3).views(3)
            token, logits = text, []
            for q in range(steps):
                step_logits = model.depformer_step(q, hidden, token, kv[q])
                logits.append(step_logits)
                token = step_logits.argmax(-1) if q < 8 else user[:, q - 8]
            outs[name] = logits[:8]
    for a, b in zip(outs["full"], outs["ours"], strict=True):
        assert torch.equal(a, b)


# -- loading ---------------------------------------------------------------------------------


def test_a_personaplex_file_under_a_moshiko_config_is_detected_and_its_unused_steps_named(
    golden, weights, caplog
) -> None:
    cfg = dict(golden["config_dict"], dep_q=8)  # moshiko's config keys, PersonaPlex's file
    with caplog.at_level(logging.INFO, logger="moshi_grpc.models"):
        lm = load_lm(weights, cfg)
    assert lm.config.persona and lm.config.to_dict()["dep_q"] == 16
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "PersonaPlex layout detected" in logged
    assert "depformer steps 8..15" in logged and "linears.8..15" in logged
    assert "depformer_emb.7..14" in logged and "gating.8..15" in logged


def test_a_persona_file_missing_a_tensor_still_fails_naming_it(golden, weights, tmp_path):
    from safetensors.torch import load_file

    from moshi_grpc.models.checkpoint import CheckpointError

    state = load_file(weights)
    del state["depformer_in.3.weight"]
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    with pytest.raises(CheckpointError, match=r"missing: depformer_in\.3\.weight"):
        load_lm(broken, golden["config_dict"])


def test_bad_personas_are_refused_clearly(golden, lm) -> None:
    gen = LMGen(lm, 1)
    voice = _voice(golden)
    with pytest.raises(PersonaError, match="text prompt is empty"):
        _plan(gen, voice, [])
    with pytest.raises(PersonaError, match="at least one frame"):
        _plan(gen, voice[:0], [5])
    with pytest.raises(PersonaError, match=r"voice codes must be in \[0, 2048\)"):
        _plan(gen, voice + 2048, [5])
    with pytest.raises(PersonaError, match="context is 64"):
        _plan(gen, voice.repeat(20, 1), [5])
    with pytest.raises(ValueError, match="a persona prompt, a replayed history, or both"):
        Start()  # a session with nothing to prefill sends no Start


# -- the runner: chunks between live ticks, the prefix cache --------------------------------


def _runner(lm, cache_mib: float | None = 64.0, rows: int = 4) -> GenRunner:
    cache = None if cache_mib is None else PrefixCache(int(cache_mib * 2**20))
    return GenRunner(LMGen(lm, rows), rows, False, cache, "test")


def _start(runner: GenRunner, slot: int, golden, prompt: int, budget_ticks: bool = False):
    """Open `slot` with the prompt; tick until its Start is done, a live neighbour in slot
    3 stepping every tick when `budget_ticks` (one chunk per tick then). The StartDone and
    the ticks it took."""
    p = golden["prompts"][prompt]
    start = Start(PersonaRequest(_voice(golden), p["prompt_tokens"], p["text_prompt"]))
    ticks = 0
    while True:
        ticks += 1
        slots, payloads = [slot], [start]
        if budget_ticks:
            slots.append(3)
            payloads.append(StepInput(torch.tensor(golden["user_codes"][ticks % 40])))
        results, _ = runner.run(slots, payloads)
        if results[0] is not DEFERRED:
            return results[0], ticks


def _live_via_runner(runner: GenRunner, slot: int, golden) -> tuple[list, list]:
    text, audio = [], []
    for frame in golden["user_codes"][: golden["live_frames"]]:
        (r,), _ = runner.run([slot], [StepInput(torch.tensor(frame))])
        text.append(r.text if r.ready else None)
        audio.append(r.audio if r.ready else None)
    return text, audio


def test_runner_prefills_in_chunks_beside_a_live_session_and_matches(golden, lm) -> None:
    runner = _runner(lm)
    runner.work.chunk_ms = 1.0
    # a tick's prefill share is under one chunk: one chunk per live tick, however fast
    runner.step_ms.update(dict.fromkeys(runner.ladder, 1e-6))
    runner.join(3, JoinPayload(GREEDY, 9))
    runner.join(0, JoinPayload(GREEDY, 0))
    done, ticks = _start(runner, 0, golden, 0, budget_ticks=True)
    p = golden["prompts"][0]
    steps = p["prefix_calls"] - 1
    voice_steps = len(golden["voice_codes"]) + 5
    chunks = -(-voice_steps // CHUNK) + -(-(steps - voice_steps) // CHUNK)
    assert isinstance(done, StartDone) and ticks == chunks  # one chunk per live tick
    assert (done.prompt_frames, done.cached, done.cached_frames) == (p["prefix_calls"], False, 0)
    assert _live_via_runner(runner, 0, golden) == (p["live_text"], p["live_audio"])


def test_a_cached_start_is_one_copy_and_gives_the_same_tokens(golden, lm) -> None:
    """The second session with a prompt starts from the cache (no prefill); one with the
    same voice and another prompt prefills only its text. Tokens are the uncached ones, bit
    for bit: greedy (the reference's) and seeded sampling."""
    runner = _runner(lm)
    cache = runner.work.cache
    sampled = SamplingConfig(0.8, 50, 0.8, 100)
    outs = []
    for slot, prompt, sampling in ((0, 0, GREEDY), (1, 0, GREEDY), (2, 1, GREEDY)):
        runner.join(slot, JoinPayload(sampling, 5))
        before = runner.work.positions
        done, _ = _start(runner, slot, golden, prompt)
        prefilled = runner.work.positions - before
        p = golden["prompts"][prompt]
        steps, voice_steps = p["prefix_calls"] - 1, len(golden["voice_codes"]) + 5
        if slot == 0:
            assert (done.cached, prefilled) == (False, steps)
        elif slot == 1:  # the whole prompt cached: no position prefilled
            assert (done.cached, done.cached_frames, prefilled) == (True, p["prefix_calls"], 0)
        else:  # the voice cached, the other prompt's text prefilled
            assert (done.cached, prefilled) == (False, steps - voice_steps)
            assert done.cached_frames == voice_steps + 1
        assert _live_via_runner(runner, slot, golden) == (p["live_text"], p["live_audio"])
        runner.leave(slot)
    st = cache.stats()
    assert (st.hits, st.voice_hits, st.misses, st.entries) == (1, 1, 1, 3)
    per_step = sum(t.nbytes for t in lm.new_kv_cache(1).tensors()[:-1]) // lm.config.context
    # one voice snapshot, one snapshot per prompt: positions times one position's K and V
    voice_steps = len(golden["voice_codes"]) + 5
    prompts_steps = sum(q["prefix_calls"] - 1 for q in golden["prompts"])
    assert st.bytes == per_step * (voice_steps + prompts_steps)
    # seeded sampling: a cached and an uncached start draw the same tokens
    for cache_mib in (None, 64.0):
        outs.append([])
        r = _runner(lm, cache_mib)
        for slot in (0, 1):
            r.join(slot, JoinPayload(sampled, 77))
            _start(r, slot, golden, 0)
            outs[-1].append(_live_via_runner(r, slot, golden))
            r.leave(slot)
    assert outs[0][0] == outs[0][1] == outs[1][0] == outs[1][1]


def test_the_cache_evicts_least_recently_used_under_its_bound(golden, lm) -> None:
    per_step = sum(t.nbytes for t in lm.new_kv_cache(1).tensors()[:-1]) // lm.config.context
    voice_steps = len(golden["voice_codes"]) + 5
    steps = golden["prompts"][0]["prefix_calls"] - 1
    runner = _runner(lm, cache_mib=per_step * (voice_steps + steps) / 2**20)
    for slot, prompt in ((0, 0), (1, 1)):
        runner.join(slot, JoinPayload(GREEDY, 0))
        _start(runner, slot, golden, prompt)
        runner.leave(slot)
    st = runner.work.cache.stats()
    assert st.evictions >= 1 and st.bytes <= runner.work.cache.capacity


# -- the service ------------------------------------------------------------------------------


async def _session(stub, golden, prompt: int | None, frames: int, persona=None):
    p = golden["prompts"][prompt] if prompt is not None else None
    if persona is None and p is not None:
        codes = [c for frame in golden["voice_codes"] for c in frame]
        persona = lm_pb2.PersonaPrompt(voice_codes=codes, text=p["text_prompt"])
    greedy = common_pb2.SamplingParams(
        text_temperature=0, text_top_k=0, audio_temperature=0, audio_top_k=0
    )
    call = stub.Step()
    await call.write(lm_pb2.StepRequest(open=lm_pb2.LmOpen(sampling=greedy, persona=persona)))
    for i, frame in enumerate(golden["user_codes"][:frames]):
        await call.write(lm_pb2.StepRequest(frame=lm_pb2.UserCodes(index=i, codes=frame)))
    await call.done_writing()
    out = []
    try:
        async for m in call:
            out.append(m)
    except grpc.aio.AioRpcError:
        pass  # the caller reads the status
    return out, call


async def test_the_lm_service_answers_a_persona_open_then_the_references_frames(
    golden, weights
) -> None:
    from conftest import FIXTURES

    from moshi_grpc.services.lm.engine import LmOptions
    from moshi_grpc.services.lm.startup import start_lm_server

    options = LmOptions(
        weights=str(weights),
        config=str(FIXTURES / "persona" / "config.json"),
        cpu_forms="off",  # (max_sessions at its default: the ladder users get)
        warmup_repeats=0,
    )
    server = await start_lm_server(ServerConfig(host="127.0.0.1", port=0), options)
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = lm_pb2_grpc.LMStub(ch)
            info = await stub.Info(common_pb2.InfoRequest())
            assert info.persona and info.prefix_cache.capacity_bytes == 1024 * 2**20
            n = golden["live_frames"]
            p = golden["prompts"][0]
            for attempt in range(2):
                out, call = await _session(stub, golden, 0, n)
                assert await call.code() == grpc.StatusCode.OK
                first, frames = out[0], out[1:]
                assert first.HasField("prompt") and not first.ready
                assert first.prompt.prefix_frames == p["prefix_calls"]
                assert first.prompt.cached == (attempt == 1)
                assert [f.index for f in frames] == list(range(n))
                assert [f.text_token for f in frames] == p["live_text"]
                assert [list(f.moshi_codes) for f in frames] == p["live_audio"]
            info = await stub.Info(common_pb2.InfoRequest())
            assert (info.prefix_cache.hits, info.prefix_cache.misses) == (1, 1)
            # bad personas: their status, and the next session is not disturbed
            bad = [
                (None, grpc.StatusCode.FAILED_PRECONDITION, "needs a persona"),
                (lm_pb2.PersonaPrompt(voice_codes=[1] * 8, text=" "), None, "is empty"),
                (lm_pb2.PersonaPrompt(voice_codes=[1] * 7, text="hi"), None, "8-code frames"),
                (lm_pb2.PersonaPrompt(voice_codes=[4096] * 8, text="hi"), None, "out of range"),
                (lm_pb2.PersonaPrompt(voice_codes=[1] * 8 * 60, text="hi"), None, "context"),
            ]
            for persona, code, message in bad:
                _, call = await _session(stub, golden, None, 0, persona=persona)
                assert await call.code() == (code or grpc.StatusCode.INVALID_ARGUMENT)
                assert message in await call.details()
            out, call = await _session(stub, golden, 1, n)
            assert [f.text_token for f in out[1:]] == golden["prompts"][1]["live_text"]
    finally:
        await server.stop(0)


async def test_a_moshiko_lm_refuses_a_persona() -> None:
    from moshi_grpc.services.lm.engine import LmOptions
    from moshi_grpc.services.lm.startup import start_lm_server

    server = await start_lm_server(
        ServerConfig(host="127.0.0.1", port=0),
        LmOptions(config="tiny", max_sessions=1, warmup_repeats=0),
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = lm_pb2_grpc.LMStub(ch)
            assert not (await stub.Info(common_pb2.InfoRequest())).persona
            call = stub.Step()
            persona = lm_pb2.PersonaPrompt(voice_codes=[1] * 8, text="hi")
            await call.write(lm_pb2.StepRequest(open=lm_pb2.LmOpen(persona=persona)))
            await call.done_writing()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "takes no persona" in err.value.details()
    finally:
        await asyncio.wait_for(server.stop(0), 10)
