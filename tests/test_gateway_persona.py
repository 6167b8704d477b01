"""Persona sessions through the gateway (services/gateway/persona.py, voices.py), on loopback:
the echo codec (real service: its codes are the frame's samples quantised, so the voice codes
the LM gets are predictable) and stand-in LM replicas that speak the persona contract
(tests/persona_lm.py). The real LM's persona side is tested end to end elsewhere.

What is checked: the voice's codes and the prompt reach the LM's open; SessionStarted comes
only after the LM's PromptReady and carries how the persona was applied; named voices are
encoded once; each bad input gets its status and touches no other session; admission by
capability; failover of a prompted session; the metrics.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from persona_lm import SILENCE_FRAMES, PersonaLm
from svc_harness import StreamDriver, run_stream

from moshi_grpc import audio
from moshi_grpc.services.codec.engine import CodecOptions
from moshi_grpc.services.codec.startup import start_codec_server
from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.services.gateway.cli import start_gateway
from moshi_grpc.services.gateway.config import GatewaySettings
from moshi_grpc.services.gateway.voices import voice_frames
from moshi_grpc.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

FLOAT32 = gateway_pb2.AUDIO_ENCODING_FLOAT32
PCM16 = gateway_pb2.AUDIO_ENCODING_PCM16
PROMPT = "You are a helpful assistant."
LIMIT_S = 30.0


def _cfg() -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=None)


def _echo_codes(frames: np.ndarray) -> list[int]:
    """What the echo codec encodes `frames` to: 8 samples per frame, quantised to 11 bits."""
    picked = frames[:, ::240].astype(np.float32)
    return (
        np.clip(np.floor((picked + np.float32(1.0)) * np.float32(1024)), 0, 2047)
        .astype(int)
        .reshape(-1)
        .tolist()
    )


@dataclass
class Stack:
    codec: object
    lms: list[PersonaLm]
    gateway: object

    @property
    def address(self) -> str:
        return self.gateway.address

    def sample(self, name: str, labels: dict | None = None) -> float:
        return self.gateway.registry.get_sample_value(name, labels or {}) or 0.0

    async def close(self) -> None:
        await self.gateway.stop(0)
        await self.codec.stop(0)
        for lm in self.lms:
            await lm.stop()


async def _stack(lms: list[PersonaLm], voice_dir=None, codec_delay_ms=0.0, **settings) -> Stack:
    options = CodecOptions(model="echo", max_wait_ms=0.0, inject_delay_ms=codec_delay_ms)
    codec = await start_codec_server(_cfg(), options)
    for lm in lms:
        await lm.start()
    gateway = await start_gateway(
        _cfg(),
        codec.address,
        ",".join(lm.address for lm in lms),
        GatewaySettings(
            refresh_interval_s=0.05,
            voice_dir=None if voice_dir is None else str(voice_dir),
            **settings,
        ),
    )
    return Stack(codec, lms, gateway)


@pytest.fixture(params=["mux", "per-session"])
def streams(request) -> str:
    """Backend streams (gateway/streams.py): the LM's open answer comes back on both kinds."""
    return request.param


@pytest.fixture
def voice_dir(tmp_path):
    audio.write_wav(tmp_path / "alice.wav", audio.speech_like(1.2, 16000, seed=5) * 0.4, 16000)
    (tmp_path / "NATF2.pt").write_bytes(b"a torch pickle")
    return tmp_path


def _named_frames(voice_dir) -> np.ndarray:
    samples, rate = audio.read_wav(voice_dir / "alice.wav", channel=0)
    return voice_frames(samples, rate, "the voice", LIMIT_S)


def _config(persona: gateway_pb2.Persona | None = None, **fields) -> gateway_pb2.ConverseRequest:
    config = gateway_pb2.SessionConfig(
        sample_rate=24000,
        encoding=FLOAT32,
        budget_ms=5000,
        max_consecutive_misses=0,
        input_pacing=gateway_pb2.INPUT_PACING_FLOW_CONTROL,
        **fields,
    )
    if persona is not None:
        config.persona.CopyFrom(persona)
    return gateway_pb2.ConverseRequest(config=config)


def _audio(n: int, seed: int = 0) -> list[gateway_pb2.ConverseRequest]:
    rng = np.random.default_rng(seed)
    frames = rng.uniform(-0.9, 0.9, size=(n, 1920)).astype("<f4")
    return [
        gateway_pb2.ConverseRequest(audio=gateway_pb2.AudioChunk(data=f.tobytes())) for f in frames
    ]


def _named(voice_id: str = "alice", prompt: str = PROMPT) -> gateway_pb2.Persona:
    return gateway_pb2.Persona(voice_id=voice_id, prompt=prompt)


def _inline(samples: np.ndarray, rate: int, prompt: str = PROMPT) -> gateway_pb2.Persona:
    voice = gateway_pb2.VoiceAudio(
        data=audio.encode_samples(samples, audio.PCM16), encoding=PCM16, sample_rate=rate
    )
    return gateway_pb2.Persona(voice_audio=voice, prompt=prompt)


async def _converse(address: str, messages: list) -> tuple[grpc.StatusCode, str, list]:
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        return await asyncio.to_thread(run_stream, stub.Converse, messages, timeout=30)


def _events(replies: list, kind: str) -> list:
    return [
        getattr(r.event, kind)
        for r in replies
        if r.WhichOneof("kind") == "event" and r.event.WhichOneof("kind") == kind
    ]


def _frames_out(replies: list) -> list[int]:
    return [r.audio.frame_index for r in replies if r.WhichOneof("kind") == "audio"]


async def test_a_named_voice_reaches_the_lm_as_codes_once_and_the_session_starts_after_it(
    voice_dir, streams
) -> None:
    lm = PersonaLm()
    stack = await _stack([lm], voice_dir, backend_streams=streams)
    try:
        first = await _converse(stack.address, [_config(_named()), *_audio(5)])
        second = await _converse(stack.address, [_config(_named()), *_audio(3)])
        with grpc.insecure_channel(stack.address) as channel:
            info = gateway_pb2_grpc.GatewayStub(channel).Info
            gateway_info = await asyncio.to_thread(info, common_pb2.InfoRequest(), timeout=5)
        encodes = stack.sample("moshi_gateway_voice_encode_seconds_count")
        readies = stack.sample("moshi_gateway_prompt_ready_seconds_count")
        started = {
            cached: stack.sample(
                "moshi_gateway_persona_sessions_total", {"voice": "named", "cached": cached}
            )
            for cached in ("false", "true")
        }
    finally:
        await stack.close()
    frames = _named_frames(voice_dir)
    codes = _echo_codes(frames)
    for (code, details, replies), n in ((first, 5), (second, 3)):
        assert code == grpc.StatusCode.OK, details
        assert replies[0].event.WhichOneof("kind") == "started"  # the first reply
        assert _frames_out(replies) == list(range(n))
        assert replies[-1].event.ended.summary.reason == "client_closed"
    # Both opens carried the voice's codes (encoded by the leased codec from the prepared
    # frames) and the prompt; the second session's codes were the kept ones.
    assert [list(o.persona.voice_codes) for o in lm.opens] == [codes, codes]
    assert [o.persona.text for o in lm.opens] == [PROMPT, PROMPT]
    prompt_frames = len(frames) + 2 * SILENCE_FRAMES + len(PROMPT)
    p1 = first[2][0].event.started.persona
    p2 = second[2][0].event.started.persona
    assert (p1.voice_id, p1.voice_frames, p1.prompt_frames, p1.cached) == (
        "alice",
        len(frames),
        prompt_frames,
        False,
    )
    assert p1.voice_encode_ms > 0 and p1.prompt_ready_ms > 0
    assert (p2.voice_frames, p2.cached, p2.voice_encode_ms) == (len(frames), True, 0.0)
    assert (encodes, readies) == (1, 2)
    assert started == {"false": 1, "true": 1}
    assert [(v.voice_id, v.frames) for v in gateway_info.voices] == [("alice", len(frames))]
    assert gateway_info.voices[0].duration_s == pytest.approx(1.2)
    assert gateway_info.persona and gateway_info.version


async def test_an_inline_voice_is_decoded_normalised_and_encoded_for_each_session() -> None:
    lm = PersonaLm()
    stack = await _stack([lm])
    voice = audio.speech_like(0.9, 16000, seed=6) * 0.2
    try:
        results = [await _converse(stack.address, [_config(_inline(voice, 16000))]) for _ in "ab"]
        encodes = stack.sample("moshi_gateway_voice_encode_seconds_count")
        inline = stack.sample(
            "moshi_gateway_persona_sessions_total", {"voice": "inline", "cached": "false"}
        )
    finally:
        await stack.close()
    pcm = audio.decode_samples(audio.encode_samples(voice, audio.PCM16), audio.PCM16)
    codes = _echo_codes(voice_frames(pcm, 16000, "the voice", LIMIT_S))
    for code, details, replies in results:
        assert code == grpc.StatusCode.OK, details
        started = replies[0].event.started.persona
        assert started.voice_id == "" and started.voice_encode_ms > 0
    assert [list(o.persona.voice_codes) for o in lm.opens] == [codes, codes]
    assert (encodes, inline) == (2, 1)


async def test_audio_waits_unread_until_the_prompt_is_in_the_model(voice_dir, streams) -> None:
    """While the LM holds its PromptReady the session is not live: no SessionStarted, and
    none of the audio the client already sent reaches the LM."""
    lm = PersonaLm()
    lm.release.clear()
    stack = await _stack([lm], voice_dir, backend_streams=streams)
    try:
        with grpc.insecure_channel(stack.address) as channel:
            driver = StreamDriver(gateway_pb2_grpc.GatewayStub(channel).Converse, _config(_named()))
            for request in _audio(4):
                driver.send(request)
            driver.close()
            await asyncio.wait_for(lm.opened.wait(), 10)  # the open, with the prompt
            await asyncio.sleep(0.2)  # room for a wrong gateway to go live anyway
            assert driver.replies == [] and lm.frames == 0
            lm.release.set()
            code = await asyncio.to_thread(driver.wait, 20)
    finally:
        await stack.close()
    assert code == grpc.StatusCode.OK, driver.details
    assert driver.replies[0].event.WhichOneof("kind") == "started"
    assert _frames_out(driver.replies) == [0, 1, 2, 3] and lm.frames == 4


async def test_an_lm_that_never_applies_the_prompt_ends_the_start_with_deadline_exceeded(
    voice_dir,
) -> None:
    lm = PersonaLm()
    lm.release.clear()
    stack = await _stack([lm], voice_dir, open_answer_timeout_s=0.3)
    try:
        code, details, replies = await _converse(stack.address, [_config(_named())])
        refused = stack.sample(
            "moshi_gateway_sessions_refused_total", {"reason": "backend_unavailable"}
        )
    finally:
        await stack.close()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and replies == []
    assert "did not answer the session's open within 0.3 s" in details
    assert refused == 1


async def test_a_codec_that_stalls_on_the_voice_ends_the_start_with_deadline_exceeded(
    voice_dir,
) -> None:
    lm = PersonaLm()
    stack = await _stack([lm], voice_dir, codec_delay_ms=800, open_answer_timeout_s=0.2)
    try:
        code, details, replies = await _converse(stack.address, [_config(_named())])
    finally:
        await stack.close()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and replies == []
    assert "(voice encode) did not answer frame 0 of 15 within 0.2 s" in details
    assert lm.opens == []  # the LM was never asked


async def test_each_bad_persona_gets_its_status_and_touches_no_other_session(
    voice_dir,
) -> None:
    lm = PersonaLm(context=100)
    stack = await _stack([lm], voice_dir)
    loud = audio.speech_like(1.0, 8000, seed=7)
    long_voice = np.tile(loud, 31)  # 31 s at the default --max-voice-s of 30 s
    garbage = gateway_pb2.Persona(
        voice_audio=gateway_pb2.VoiceAudio(data=b"OggS" + bytes(60), encoding=5, sample_rate=24000),
        prompt=PROMPT,
    )
    bad = [
        (
            _named("carol"),
            grpc.StatusCode.NOT_FOUND,
            "unknown voice_id 'carol'; the gateway's voices: alice",
        ),
        (_named("NATF2"), grpc.StatusCode.INVALID_ARGUMENT, "supported voice format is a WAV"),
        (_inline(long_voice, 8000), grpc.StatusCode.INVALID_ARGUMENT, "at most 30 s"),
        (garbage, grpc.StatusCode.INVALID_ARGUMENT, "does not decode"),
        (_inline(np.zeros(8000, np.float32), 8000), grpc.StatusCode.INVALID_ARGUMENT, "silent"),
        (_named(prompt="  "), grpc.StatusCode.INVALID_ARGUMENT, "persona.prompt is empty"),
        (gateway_pb2.Persona(prompt=PROMPT), grpc.StatusCode.INVALID_ARGUMENT, "has no voice"),
        # The LM's refusal (the prompt does not fit its context) reaches the client as is.
        (_named(prompt="x" * 100), grpc.StatusCode.INVALID_ARGUMENT, "more than the context"),
    ]
    try:
        with grpc.insecure_channel(stack.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            # A live session throughout: each refusal happens while it runs.
            good = StreamDriver(stub.Converse, _config(_named()))
            for request in _audio(3, seed=1):
                good.send(request)
            results = [await _converse(stack.address, [_config(p)]) for p, _, _ in bad]
            for request in _audio(3, seed=2):
                good.send(request)
            good.close()
            good_code = await asyncio.to_thread(good.wait, 20)
        invalid = stack.sample("moshi_gateway_sessions_refused_total", {"reason": "invalid"})
    finally:
        await stack.close()
    for (persona, want, message), (code, details, replies) in zip(bad, results, strict=True):
        assert (code, replies) == (want, []), (details, persona)
        assert message in details
    assert invalid == len(bad)
    assert good_code == grpc.StatusCode.OK, good.details
    assert _frames_out(good.replies) == list(range(6))
    assert good.replies[-1].event.ended.summary.reason == "client_closed"


async def test_admission_goes_by_the_model_a_session_needs(voice_dir) -> None:
    persona_lm, plain_lm = PersonaLm(persona=True), PersonaLm(persona=False)
    stack = await _stack([persona_lm, plain_lm], voice_dir)
    try:
        with_persona = await _converse(stack.address, [_config(_named()), *_audio(2)])
        plain = await _converse(stack.address, [_config(), *_audio(2)])
    finally:
        await stack.close()
    for code, details, _ in (with_persona, plain):
        assert code == grpc.StatusCode.OK, details
    assert with_persona[2][0].event.started.lm_replica == persona_lm.address
    assert plain[2][0].event.started.lm_replica == plain_lm.address
    assert not plain[2][0].event.started.HasField("persona")
    assert [o.HasField("persona") for o in persona_lm.opens] == [True]
    assert [o.HasField("persona") for o in plain_lm.opens] == [False]


async def test_a_session_with_no_replica_of_its_model_is_a_failed_precondition(voice_dir) -> None:
    for lm, persona, missing in (
        (PersonaLm(persona=False), _named(), "no LM replica behind this gateway serves a persona"),
        (PersonaLm(persona=True), None, "every LM replica behind this gateway serves a persona"),
    ):
        stack = await _stack([lm], voice_dir)
        try:
            code, details, replies = await _converse(stack.address, [_config(persona)])
            refused = stack.sample(
                "moshi_gateway_sessions_refused_total", {"reason": "wrong_model"}
            )
        finally:
            await stack.close()
        assert (code, replies, refused) == (grpc.StatusCode.FAILED_PRECONDITION, [], 1)
        assert missing in details and "retry" not in details
        assert lm.opens == []  # refused at admission: the LM never saw it


async def test_a_prompted_session_moves_with_its_persona_when_its_lm_fails(
    voice_dir, streams
) -> None:
    """The new replica's open carries the same persona and the history: it applies the
    prompt, answers the open (PromptReady, which the link does not take for a frame's
    answer), then the frames; every frame is answered."""
    lms = [PersonaLm(), PersonaLm()]
    stack = await _stack(lms, voice_dir, backend_streams=streams)
    try:
        with grpc.insecure_channel(stack.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            driver = StreamDriver(stub.Converse, _config(_named()))
            for request in _audio(4, seed=3):
                driver.send(request)
            assert await asyncio.to_thread(driver.wait_for, lambda r: r.audio.frame_index == 3)
            first = next(lm for lm in lms if lm.opens)
            other = next(lm for lm in lms if lm is not first)
            await first.stop()
            for request in _audio(4, seed=4):
                driver.send(request)
            driver.close()
            code = await asyncio.to_thread(driver.wait, 20)
    finally:
        await stack.close()
    assert code == grpc.StatusCode.OK, driver.details
    assert _frames_out(driver.replies) == list(range(8))
    (moved,) = other.opens
    assert moved.persona == first.opens[0].persona
    assert len(moved.replay) >= 4  # the answered history, replayed after the prompt
    (failover,) = _events(driver.replies, "failover")
    assert (failover.from_replica, failover.to_replica) == (first.address, other.address)
    # The echo continues across the move: frame t answers with frame t - 1's codes.
    assert other.frames >= 4 and not math.isnan(driver.replies[-1].event.ended.summary.duration_s)
