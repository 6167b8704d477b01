"""Persona sessions end to end on the real services: the codec (tiny Mimi), the LM in
PersonaPlex's layout (`--lm-config personaplex-small`) and the gateway, on loopback.

The LM's open cannot be watched on the wire here, so what it carried is checked through the
LM's prefix cache: a prefix is keyed by (model, voice codes, text tokens), and an open made
by hand with the codes the codec gives for the gateway's prepared voice frames finds the
whole prompt cached. Greedy sessions make replies comparable token for token: a cached
start, an uncached one and a session moved to another replica mid-way all give the same
reply.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from svc_harness import LoopThread, StreamDriver, run_stream

from moshi_grpc import audio
from moshi_grpc.clients import ConverseClient, ConverseError, Persona
from moshi_grpc.models.persona import wrap_prompt
from moshi_grpc.models.text import TextTokenizer
from moshi_grpc.services.codec.engine import CodecOptions
from moshi_grpc.services.codec.startup import start_codec_server
from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.services.gateway.cli import start_gateway
from moshi_grpc.services.gateway.config import GatewaySettings
from moshi_grpc.services.gateway.voices import voice_frames
from moshi_grpc.services.lm.engine import LmOptions
from moshi_grpc.services.lm.startup import start_lm_server
from moshi_grpc.v1 import (
    codec_pb2,
    codec_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    lm_pb2,
    lm_pb2_grpc,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "You are a helpful assistant."
SILENCE = 6  # frames after the voice and after the text (PersonaPlex)
# Greedy, and a budget no loaded machine misses: these tests compare replies exactly (a late
# frame would be silence); the budget's own rules are tested with fake clocks elsewhere.
GREEDY = {"text_temperature": 0.0, "audio_temperature": 0.0, "seed": 1, "budget_ms": 10_000}


def _cfg() -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=None)


def _codec_options() -> CodecOptions:
    return CodecOptions(config="tiny", max_wait_ms=0.0, cpu_forms="off", warmup_repeats=0)


def _lm_options(config: str = "personaplex-small") -> LmOptions:
    return LmOptions(config=config, cpu_forms="off", warmup_repeats=0)


@dataclass
class Stack:
    loop: LoopThread
    codec: object
    lm: object
    gateway: object  # over the persona LM, with the voice directory
    plain_gateway: object  # over a moshiko-layout LM (no persona)
    voice_file: object


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    voices = tmp_path_factory.mktemp("voices")
    voice_file = voices / "alice.wav"
    audio.write_wav(voice_file, audio.speech_like(1.5, 16000, seed=5) * 0.3, 16000)
    loop = LoopThread()

    async def start():
        codec = await start_codec_server(_cfg(), _codec_options())
        lm = await start_lm_server(_cfg(), _lm_options())
        plain = await start_lm_server(_cfg(), _lm_options("tiny"))
        settings = GatewaySettings(refresh_interval_s=0.05, voice_dir=str(voices))
        gateway = await start_gateway(_cfg(), codec.address, lm.address, settings)
        plain_gateway = await start_gateway(_cfg(), codec.address, plain.address, settings)
        return [codec, lm, plain, gateway, plain_gateway]

    servers = loop.run(start(), timeout=120)
    codec, lm, _, gateway, plain_gateway = servers
    try:
        yield Stack(loop, codec, lm, gateway, plain_gateway, voice_file)
    finally:

        async def stop():
            for server in reversed(servers):
                await server.stop(0)

        loop.run(stop(), timeout=60)
        loop.close()


def _prompt_frames(voice_frames_: int, prompt: str = PROMPT) -> int:
    return voice_frames_ + SILENCE + len(TextTokenizer().encode(wrap_prompt(prompt))) + SILENCE


def _codec_codes(address: str, frames: np.ndarray) -> list[int]:
    """Codes of `frames` from a fresh Encode stream on the codec (what a voice encode does)."""
    messages = [codec_pb2.EncodeRequest(open=codec_pb2.CodecOpen(session_id="test"))]
    messages += [
        codec_pb2.EncodeRequest(
            frame=codec_pb2.PcmFrame(index=i, pcm_f32le=f.astype("<f4").tobytes())
        )
        for i, f in enumerate(frames)
    ]
    with grpc.insecure_channel(address) as channel:
        code, details, replies = run_stream(codec_pb2_grpc.CodecStub(channel).Encode, messages)
    assert code == grpc.StatusCode.OK, details
    return [c for r in replies for c in r.codes]


def _prompt_ready(address: str, codes: list[int], prompt: str = PROMPT) -> lm_pb2.PromptReady:
    """The LM's answer to an open with this persona (and no frame)."""
    persona = lm_pb2.PersonaPrompt(voice_codes=codes, text=prompt)
    with grpc.insecure_channel(address) as channel:
        open_ = lm_pb2.StepRequest(open=lm_pb2.LmOpen(session_id="test", persona=persona))
        code, details, replies = run_stream(lm_pb2_grpc.LMStub(channel).Step, [open_])
    assert code == grpc.StatusCode.OK, details
    (ready,) = replies
    return ready.prompt


def _input() -> np.ndarray:
    return audio.speech_like(1.0, 24000, seed=11)


def test_a_named_voice_session_end_to_end_and_the_codes_its_open_carried(stack: Stack) -> None:
    named = Persona.named("alice", PROMPT)
    with ConverseClient(stack.gateway.address) as client:
        first = client.converse_array(_input(), 24000, persona=named, **GREEDY).collect()
        again = client.converse_array(_input(), 24000, persona=named, **GREEDY).collect()
    samples, rate = audio.read_wav(stack.voice_file, channel=0)
    frames = voice_frames(samples, rate, "the voice", 30.0)
    p1, p2 = first.started.persona, again.started.persona
    assert (p1.voice_id, p1.voice_frames, p1.cached) == ("alice", len(frames), False)
    assert p1.prompt_frames == _prompt_frames(len(frames)) and p1.voice_encode_ms > 0
    assert (p2.cached, p2.voice_encode_ms, p2.prompt_frames) == (True, 0.0, p1.prompt_frames)
    for result in (first, again):
        assert result.frames == 13 and result.summary.reason == "client_closed"
        assert result.summary.frames_late == 0
    # Greedy: a start from the LM's prefix cache replies exactly as the prefilled one.
    assert np.array_equal(first.audio, again.audio) and first.transcript == again.transcript
    # The open carried the codes the codec makes of the prepared (normalised) voice frames:
    # the same persona opened by hand finds the whole prompt in the LM's prefix cache...
    codes = _codec_codes(stack.codec.address, frames)
    ready = _prompt_ready(stack.lm.address, codes)
    assert ready.cached and ready.cached_frames == ready.prefix_frames == p1.prompt_frames
    # ...and the voice as recorded (not normalised) is another voice.
    raw = voice_frames(samples, rate, "the voice", 30.0)
    scale = np.float32(0.5)
    assert not _prompt_ready(
        stack.lm.address, _codec_codes(stack.codec.address, raw * scale)
    ).cached


def test_an_inline_wav_voice_end_to_end(stack: Stack, tmp_path) -> None:
    path = tmp_path / "mine.wav"
    audio.write_wav(path, audio.speech_like(0.9, 22050, seed=12) * 0.6, 22050)
    with ConverseClient(stack.gateway.address) as client:
        result = client.converse_array(
            _input(), 24000, persona=Persona.from_wav(path, "You are a pirate."), **GREEDY
        ).collect()
    samples, rate = audio.read_wav(path, channel=0)
    frames = voice_frames(samples, rate, "the voice", 30.0)
    p = result.started.persona
    assert (p.voice_id, p.voice_frames, p.cached) == ("", len(frames), False)
    assert p.prompt_frames == _prompt_frames(len(frames), "You are a pirate.")
    assert result.frames == 13 and result.summary.reason == "client_closed"


def test_bad_personas_on_the_real_services(stack: Stack) -> None:
    def refusal(address: str, persona: Persona | None) -> ConverseError:
        with ConverseClient(address) as client, pytest.raises(ConverseError) as err:
            client.converse_array(_input(), 24000, persona=persona).collect()
        return err.value

    # A prompt that does not fit the model's context: the LM's INVALID_ARGUMENT, passed on.
    long = refusal(stack.gateway.address, Persona.named("alice", "talk " * 3200))
    assert long.code == grpc.StatusCode.INVALID_ARGUMENT and "context" in long.details
    # A persona to a model without one, and no persona to a persona model: refused at
    # admission, naming what is missing.
    wrong = refusal(stack.plain_gateway.address, Persona.named("alice", PROMPT))
    assert wrong.code == grpc.StatusCode.FAILED_PRECONDITION and "persona model" in wrong.details
    missing = refusal(stack.gateway.address, None)
    assert missing.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "set SessionConfig.persona" in missing.details
    # Nothing of it touched the next session.
    with ConverseClient(stack.gateway.address) as client:
        ok = client.converse_array(_input(), 24000, persona=Persona.named("alice", PROMPT))
        assert ok.collect().summary.reason == "client_closed"


def test_a_prompted_session_moved_mid_way_replies_as_if_it_had_not_moved(stack: Stack) -> None:
    """Two persona LM replicas; one session runs uninterrupted, the same session again loses
    its replica after a few frames. The new replica applies the prompt, then the replayed
    history (greedy): every frame of the reply is the uninterrupted session's."""
    loop = stack.loop

    async def start():
        lms = [await start_lm_server(_cfg(), _lm_options()) for _ in range(2)]
        settings = GatewaySettings(refresh_interval_s=0.05, voice_dir=str(stack.voice_file.parent))
        addresses = ",".join(lm.address for lm in lms)
        gateway = await start_gateway(_cfg(), stack.codec.address, addresses, settings)
        return lms, gateway

    lms, gateway = loop.run(start(), timeout=120)
    x = audio.speech_like(1.6, 24000, seed=13)
    chunks = [
        gateway_pb2.ConverseRequest(
            audio=gateway_pb2.AudioChunk(data=x[i : i + 1920].astype("<f4").tobytes())
        )
        for i in range(0, x.size, 1920)
    ]
    config = gateway_pb2.SessionConfig(
        sample_rate=24000,
        encoding=gateway_pb2.AUDIO_ENCODING_FLOAT32,
        seed=1,
        budget_ms=10_000,
        max_consecutive_misses=0,
        input_pacing=gateway_pb2.INPUT_PACING_FLOW_CONTROL,
        persona=gateway_pb2.Persona(voice_id="alice", prompt=PROMPT),
    )
    config.sampling.text_temperature = 0.0
    config.sampling.audio_temperature = 0.0
    first = gateway_pb2.ConverseRequest(config=config)
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            converse = gateway_pb2_grpc.GatewayStub(channel).Converse
            code, details, calm = run_stream(converse, [first, *chunks], timeout=60)
            assert code == grpc.StatusCode.OK, details
            moved = StreamDriver(converse, first)
            for chunk in chunks[:8]:
                moved.send(chunk)
            assert moved.wait_for(lambda r: r.audio.frame_index == 5, timeout=30)
            replica = moved.replies[0].event.started.lm_replica
            victim = next(lm for lm in lms if lm.address == replica)
            loop.run(victim.stop(0))
            for chunk in chunks[8:]:
                moved.send(chunk)
            moved.close()
            assert moved.wait(60) == grpc.StatusCode.OK, moved.details
    finally:

        async def stop():
            await gateway.stop(0)
            for lm in lms:
                with contextlib.suppress(Exception):
                    await lm.stop(0)

        loop.run(stop(), timeout=60)
    failovers = [r.event.failover for r in moved.replies if r.event.HasField("failover")]
    assert len(failovers) == 1 and failovers[0].from_replica == replica

    def reply(replies) -> list[tuple[int, bytes, bool]]:
        return [(r.audio.frame_index, r.audio.data, r.audio.silence) for r in replies
                if r.WhichOneof("kind") == "audio"]  # fmt: skip

    assert len(reply(calm)) == len(chunks)
    assert reply(moved.replies) == reply(calm)
