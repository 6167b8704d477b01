"""Persona sessions from the SDK and the CLI (clients/): `Persona` on the session options,
no audio before SessionStarted, `info()` / `voices()`, `converse --voice --prompt` and
`--list-voices`. Against a real gateway over the echo codec and a stand-in persona LM
(tests/persona_lm.py), on a background loop."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
from persona_lm import PersonaLm
from svc_harness import LoopThread

from moshi_grpc import audio
from moshi_grpc.cli import main
from moshi_grpc.clients import (
    AsyncConverseClient,
    ClientConfigError,
    ConverseClient,
    ConverseError,
    Persona,
    PersonaStarted,
)
from moshi_grpc.services.codec.engine import CodecOptions
from moshi_grpc.services.codec.startup import start_codec_server
from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.services.gateway.cli import start_gateway
from moshi_grpc.services.gateway.config import GatewaySettings
from moshi_grpc.services.gateway.voices import decode_voice, voice_frames
from moshi_grpc.v1 import gateway_pb2

PROMPT = "You are a helpful assistant."


@dataclass
class Live:
    loop: LoopThread
    lm: PersonaLm
    address: str

    def hold_prompts(self) -> None:
        """The LM holds the next PromptReady until `release_prompts`; `lm.opened` is set at
        the next open."""

        async def hold() -> None:
            self.lm.release.clear()
            self.lm.opened.clear()

        self.loop.run(hold())

    def release_prompts(self) -> None:
        self.loop.loop.call_soon_threadsafe(self.lm.release.set)


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[Live]:
    voices = tmp_path_factory.mktemp("voices")
    audio.write_wav(voices / "alice.wav", audio.speech_like(1.2, 16000, seed=5) * 0.4, 16000)
    loop = LoopThread()
    lm = PersonaLm()

    def cfg() -> ServerConfig:
        return ServerConfig(host="127.0.0.1", port=0, metrics_port=None)

    async def start():
        codec = await start_codec_server(cfg(), CodecOptions(model="echo", max_wait_ms=0.0))
        await lm.start()
        settings = GatewaySettings(refresh_interval_s=0.05, voice_dir=str(voices))
        gateway = await start_gateway(cfg(), codec.address, lm.address, settings)
        return codec, gateway

    codec, gateway = loop.run(start())
    try:
        yield Live(loop, lm, gateway.address)
    finally:

        async def stop():
            await gateway.stop(0)
            await codec.stop(0)
            await lm.stop()

        loop.run(stop())
        loop.close()


def _signal(seconds: float = 0.4) -> np.ndarray:
    return audio.speech_like(seconds, 24000, seed=9)


class _Watched:
    """The caller's chunks; remembers how many prompts the LM had made ready when the SDK
    pulled the first one."""

    def __init__(self, lm: PersonaLm, x: np.ndarray) -> None:
        self.lm = lm
        self.x = x
        self.ready_at_first_pull: int | None = None

    def __iter__(self):
        for i in range(0, self.x.size, 1920):
            if self.ready_at_first_pull is None:
                self.ready_at_first_pull = self.lm.prompts_ready
            yield self.x[i : i + 1920]


def test_persona_options_are_checked_and_sent_losslessly(tmp_path) -> None:
    with pytest.raises(ClientConfigError, match="prompt is empty"):
        Persona.named("alice", "  ")
    with pytest.raises(ClientConfigError, match="exactly one voice"):
        Persona(PROMPT)
    with pytest.raises(ClientConfigError, match="supported voice format is a WAV"):
        Persona.from_voice(tmp_path / "NATF2.pt", PROMPT)
    with pytest.raises(ClientConfigError, match="cannot read"):
        Persona.from_voice(tmp_path / "missing.wav", PROMPT)
    assert Persona.from_voice("alice", PROMPT).to_proto() == gateway_pb2.Persona(
        voice_id="alice", prompt=PROMPT
    )
    # A PCM16 file goes as PCM16 (exactly its samples), other audio as float32.
    x = audio.speech_like(0.5, 16000, seed=1)
    audio.write_wav(tmp_path / "v.wav", x, 16000)
    pcm = Persona.from_voice(tmp_path / "v.wav", PROMPT).to_proto().voice_audio
    read, _ = audio.read_wav(tmp_path / "v.wav")
    assert (pcm.encoding, pcm.sample_rate) == (gateway_pb2.AUDIO_ENCODING_PCM16, 16000)
    assert np.array_equal(audio.decode_samples(pcm.data, audio.PCM16), read)
    floats = Persona(PROMPT, voice_samples=x, voice_rate=16000).to_proto().voice_audio
    assert floats.encoding == gateway_pb2.AUDIO_ENCODING_FLOAT32
    assert np.array_equal(audio.decode_samples(floats.data, audio.FLOAT32), x)
    # 30 s of float32 at 48 kHz would not fit the gateway's 4 MiB messages: it goes at
    # 24 kHz, resampled as the gateway itself would (the same frames in the end).
    long = audio.speech_like(30.0, 48000, seed=2)
    big = Persona(PROMPT, voice_samples=long, voice_rate=48000).to_proto()
    assert big.voice_audio.sample_rate == 24000
    assert big.ByteSize() < 4 * 2**20
    sent = decode_voice(big.voice_audio)
    assert np.array_equal(voice_frames(*sent, "v", 30.0), voice_frames(long, 48000, "v", 30.0))


def test_sync_sdk_sends_no_live_audio_before_the_persona_session_started(live: Live) -> None:
    live.hold_prompts()
    source = _Watched(live.lm, _signal())
    persona = Persona.named("alice", PROMPT)
    try:
        with ConverseClient(live.address) as client, ThreadPoolExecutor(1) as pool:
            conv = client.converse(source, sample_rate=24000, input_pacing="real_time",
                                   persona=persona, budget_ms=5000)  # fmt: skip
            events = pool.submit(list, conv)
            asyncio.run_coroutine_threadsafe(live.lm.opened.wait(), live.loop.loop).result(10)
            live.release_prompts()
            result = events.result(30)
    finally:
        live.release_prompts()
    started = result[0]
    assert started.persona == PersonaStarted(
        "alice",
        started.persona.voice_frames,
        started.persona.prompt_frames,
        started.persona.cached,
        started.persona.voice_encode_ms,
        started.persona.prompt_ready_ms,
    )
    assert started.persona.voice_id == "alice" and started.persona.prompt_ready_ms > 0
    assert source.ready_at_first_pull == live.lm.prompts_ready  # pulled only once started
    assert conv.summary is not None and conv.summary.reason == "client_closed"
    assert live.lm.opens[-1].persona.text == PROMPT


async def test_async_sdk_waits_for_the_start_of_a_persona_session_and_lists_voices(
    live: Live,
) -> None:
    live.hold_prompts()
    source = _Watched(live.lm, _signal())
    try:
        async with AsyncConverseClient(live.address) as client:
            info = await client.info()
            conv = client.converse(source, sample_rate=24000, input_pacing="real_time",
                                   persona=Persona.named("alice", PROMPT), budget_ms=5000)  # fmt: skip
            events = conv.__aiter__()
            first = asyncio.ensure_future(events.__anext__())
            await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(live.lm.opened.wait(), live.loop.loop)
            )
            await asyncio.sleep(2.5)  # past the 2 s gate a plain session has
            assert source.ready_at_first_pull is None  # nothing pulled yet
            live.release_prompts()
            started = await first
            rest = [event async for event in events]
    finally:
        live.release_prompts()
    assert started.persona is not None and started.persona.voice_id == "alice"
    assert source.ready_at_first_pull == live.lm.prompts_ready
    assert rest and conv.summary.reason == "client_closed"
    assert [(v.voice_id, v.frames) for v in info.voices] == [("alice", 15)]
    assert info.persona and info.version


def test_converse_cli_with_a_named_voice_a_wav_file_and_the_voice_list(live: Live, tmp_path):
    src = tmp_path / "in.wav"
    audio.write_wav(src, _signal(), 24000)
    voice = tmp_path / "mine.wav"
    audio.write_wav(voice, audio.speech_like(0.8, 22050, seed=3) * 0.5, 22050)

    def cli(*argv: str) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(["converse", *argv, "--addr", live.address])
        return rc, out.getvalue()

    rc, text = cli(str(src), str(tmp_path / "o1.wav"), "--voice", "alice", "--prompt", PROMPT)
    assert rc == 0 and "persona: voice alice (named), 15 voice frames" in text
    rc, text = cli(str(src), str(tmp_path / "o2.wav"), "--voice", str(voice), "--prompt", PROMPT,
                   "--json")  # fmt: skip
    persona = json.loads(text)["persona"]
    assert rc == 0 and persona["voice_id"] == "" and persona["voice_frames"] == 10
    assert persona["voice_encode_ms"] > 0
    rc, text = cli("--list-voices")
    assert rc == 0 and "serves persona sessions" in text and "alice  1.2 s  15 frames" in text


def test_converse_cli_refuses_half_a_persona(capsys, tmp_path) -> None:
    src = tmp_path / "in.wav"
    audio.write_wav(src, _signal(), 24000)
    for argv, message in (
        (["--prompt", PROMPT], "--prompt needs --voice"),
        (["--voice", "alice"], "--voice needs --prompt"),
        (["--voice", str(tmp_path / "x.pt"), "--prompt", PROMPT], "WAV"),
    ):
        assert main(["converse", str(src), str(tmp_path / "o.wav"), *argv]) == 2
        assert message in capsys.readouterr().err
    assert main(["converse"]) == 2
    assert "IN and OUT are required" in capsys.readouterr().err


def test_sdk_reports_a_refused_persona(live: Live) -> None:
    with ConverseClient(live.address) as client:
        with pytest.raises(ConverseError) as err:
            conv = client.converse_array(_signal(), 24000, persona=Persona.named("bob", PROMPT))
            list(conv)
    assert err.value.code.name == "NOT_FOUND" and "alice" in err.value.details
    assert err.value.attempts == 1  # not retried
