"""Wire encodings through a real gateway: PCM16, float32, G.711 mu-law/A-law and Ogg Opus.

One loopback stack (echo codec + echo LM + gateway, in-process grpc.aio servers on port 0)
for the module. The echo backends answer input frame t with output frame t+1 (the frame
sample-and-held every 240 samples), so a signal of loud and silent stretches comes back as
the same pattern one frame later, whatever lossy coding sits on either side: that pattern
is what each encoding's round trip is checked on. Nothing mocks the transport.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from moshi_grpc import audio
from moshi_grpc.clients import ClientConfigError, ConverseClient, ConverseError
from moshi_grpc.v1 import gateway_pb2, gateway_pb2_grpc

LOOSE = 5000  # budget (ms): a loaded CI machine must not turn frames into silence
FRAME_S = 0.08


@dataclass
class EchoStack:
    addr: str
    gateway: object


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoStack]:
    from svc_harness import LoopThread

    from moshi_grpc.services.codec.engine import CodecOptions
    from moshi_grpc.services.codec.startup import start_codec_server
    from moshi_grpc.services.common.server import ServerConfig
    from moshi_grpc.services.gateway.cli import start_gateway
    from moshi_grpc.services.gateway.config import GatewaySettings
    from moshi_grpc.services.lm.engine import LmOptions
    from moshi_grpc.services.lm.startup import start_lm_server

    def cfg() -> ServerConfig:
        return ServerConfig(host="127.0.0.1", port=0)

    async def start():
        codec = await start_codec_server(
            cfg(), CodecOptions(model="echo", max_sessions=8, max_wait_ms=0.0)
        )
        lm = await start_lm_server(cfg(), LmOptions(model="echo", max_sessions=8, max_wait_ms=0.0))
        gw = await start_gateway(
            cfg(), codec.address, lm.address, GatewaySettings(refresh_interval_s=0.1)
        )
        return [codec, lm, gw]

    loop = LoopThread()
    servers = loop.run(start(), timeout=120)
    try:
        yield EchoStack(servers[2].address, servers[2])
    finally:

        async def stop():
            for s in reversed(servers):
                await s.stop(0)

        loop.run(stop(), timeout=60)
        loop.close()


def _bursts(rate: int, frames: int = 18, period: int = 6) -> np.ndarray:
    """Loud for `period // 2` frames, silent for as many, repeated: a 300 Hz tone with a
    little vibrato (an Opus-friendly, speech-band sound), gated per 80 ms frame."""
    f = rate * 80 // 1000
    t = np.arange(frames * f) / rate
    tone = 0.5 * np.sin(2 * np.pi * (300 * t + 3 * np.sin(2 * np.pi * 5 * t)))
    gate = np.repeat([(i % period) < period // 2 for i in range(frames)], f)
    return (tone * gate).astype(np.float32)


def _frame_rms(y: np.ndarray, rate: int) -> np.ndarray:
    f = rate * 80 // 1000
    n = len(y) // f
    return np.sqrt(np.mean(y[: n * f].reshape(n, f) ** 2, axis=1))


def _check_echo_pattern(y: np.ndarray, rate: int, frames: int = 18, period: int = 6) -> None:
    """Output frame t+1 is loud exactly when input frame t was (boundary frames aside, where
    coding delays smear a few ms across the edge)."""
    rms = _frame_rms(y, rate)
    for t in range(frames - 1):
        if t % (period // 2) in (0, period // 2 - 1) or t + 1 >= len(rms):
            continue  # the first and last frame of each stretch
        loud = (t % period) < period // 2
        if loud:
            assert rms[t + 1] > 0.05, (t, rms.round(3).tolist())
        else:
            assert rms[t + 1] < 0.02, (t, rms.round(3).tolist())


def _collect(addr: str, chunks, rate: int, encoding: str):
    with ConverseClient(addr) as client:
        client.wait_ready(10)
        conv = client.converse(
            chunks, sample_rate=rate, encoding=encoding, window_frames=3, budget_ms=LOOSE
        )
        return conv.collect()


@pytest.mark.parametrize(
    ("encoding", "rate"),
    [
        (audio.PCM16, 16000),
        (audio.FLOAT32, 24000),
        (audio.MULAW, 8000),
        (audio.ALAW, 8000),
        (audio.MULAW, 16000),
        (audio.OGG_OPUS, 24000),
        (audio.OGG_OPUS, 8000),
        (audio.OGG_OPUS, 48000),
    ],
)
def test_each_encoding_round_trips_through_echo(echo: EchoStack, encoding: str, rate: int) -> None:
    x = _bursts(rate)
    f = rate * 80 // 1000
    result = _collect(echo.addr, (x[i : i + f] for i in range(0, len(x), f)), rate, encoding)
    assert result.frames == 18 and result.summary is not None
    assert result.summary.frames_in == 18 and result.summary.frames_dropped == 0
    assert result.summary.reason == "client_closed"
    _check_echo_pattern(result.audio, rate)
    # Bytes on the wire in each direction, per second of audio.
    sent_bps = result.bytes_sent / (len(x) / rate)
    recv_bps = len(result.data) / (result.frames * FRAME_S)
    if encoding == audio.OGG_OPUS:
        # Opus: a few kB/s (tens of kbit/s) instead of PCM16's 2 bytes per sample.
        assert 0 < sent_bps < rate * 2 / 4 and 0 < recv_bps < rate * 2 / 4
        assert result.data.startswith(b"OggS") and b"OpusHead" in result.data[:200]
        y, _ = audio.read_opus_bytes(result.data, rate)  # the reply is a valid .opus stream
        assert abs(len(y) - len(result.audio)) <= rate // 10
    else:
        width = audio.bytes_per_sample(encoding)
        assert sent_bps == pytest.approx(rate * width, rel=0.01)
        assert recv_bps == pytest.approx(rate * width)


def test_g711_matches_pcm16_up_to_its_quantisation(echo: EchoStack) -> None:
    """The same input through a PCM16 and a G.711 session: the replies differ only by G.711's
    companding error (both directions), far below the signal."""
    rate = 8000
    x = audio.speech_like(1.2, rate, seed=4)
    ref = _collect(echo.addr, [x], rate, audio.PCM16).audio
    for encoding in (audio.MULAW, audio.ALAW):
        y = _collect(echo.addr, [x], rate, encoding).audio
        assert len(y) == len(ref)
        snr = 10 * np.log10(np.sum(ref**2) / np.sum((ref - y) ** 2))
        assert snr > 25, (encoding, snr)


def test_opus_input_split_at_any_byte_boundary(echo: EchoStack) -> None:
    """The client's Ogg Opus stream cut into pieces of 1..97 bytes, wherever they fall (inside
    page headers too), gives the same reply pattern."""
    rate = 16000
    x = _bursts(rate)
    enc = audio.StreamEncoder(audio.OGG_OPUS, rate)
    stream = enc.encode(x) + enc.flush()
    rng = np.random.default_rng(7)
    pieces, pos = [], 0
    while pos < len(stream):
        n = int(rng.choice([1, 2, 3, 5, 13, 27, 28, 97]))
        pieces.append(stream[pos : pos + n])
        pos += n
    result = _collect(echo.addr, pieces, rate, audio.OGG_OPUS)
    assert result.frames == 18 and result.summary.frames_dropped == 0
    assert result.bytes_sent == len(stream)
    _check_echo_pattern(result.audio, rate)


def _raw_session(addr: str, requests: list) -> tuple[grpc.StatusCode, str, list]:
    with grpc.insecure_channel(addr) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        replies = []
        try:
            for r in stub.Converse(iter(requests), timeout=30):
                replies.append(r)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", replies
        return grpc.StatusCode.OK, "", replies


def _config(rate: int, encoding: int) -> gateway_pb2.ConverseRequest:
    return gateway_pb2.ConverseRequest(
        config=gateway_pb2.SessionConfig(sample_rate=rate, encoding=encoding, budget_ms=LOOSE)
    )


def _chunk(data: bytes) -> gateway_pb2.ConverseRequest:
    return gateway_pb2.ConverseRequest(audio=gateway_pb2.AudioChunk(data=data))


@pytest.mark.parametrize(
    ("requests", "match"),
    [
        # Not an Ogg stream at all (a wav file's bytes).
        ([_config(24000, gateway_pb2.AUDIO_ENCODING_OGG_OPUS), _chunk(b"RIFF" + bytes(60))], "Ogg"),
        # Good Ogg Opus, then bytes that break the page structure.
        (
            [
                _config(16000, gateway_pb2.AUDIO_ENCODING_OGG_OPUS),
                _chunk(audio.StreamEncoder(audio.OGG_OPUS, 16000).encode(np.zeros(1280))),
                _chunk(b"garbage!" * 8),
            ],
            "Ogg",
        ),
        ([_config(8000, gateway_pb2.AUDIO_ENCODING_MULAW), _chunk(b"")], "empty"),
        ([_config(8000, gateway_pb2.AUDIO_ENCODING_ALAW), _chunk(b"")], "empty"),
        # Opus codes at 8/12/16/24/48 kHz only.
        ([_config(44100, gateway_pb2.AUDIO_ENCODING_OGG_OPUS)], "Ogg Opus needs"),
    ],
    ids=["opus-not-ogg", "opus-broken-page", "mulaw-empty", "alaw-empty", "opus-rate"],
)
def test_bad_encoded_bytes_get_invalid_argument_and_end_cleanly(
    echo: EchoStack, requests, match: str
) -> None:
    code, details, replies = _raw_session(echo.addr, requests)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and match in details, details
    events = [r.event for r in replies if r.WhichOneof("kind") == "event"]
    if events:  # admitted sessions end with their summary, before the status
        assert events[-1].WhichOneof("kind") == "ended"
    # The session is gone (its slots freed), and the gateway serves the next one.
    assert echo.gateway.servicer.sessions == {}
    x = _bursts(8000, frames=6)
    result = _collect(echo.addr, [x], 8000, audio.MULAW)
    assert result.frames == 6 and result.summary.reason == "client_closed"


def test_sdk_checks_opus_rate_before_sending(echo: EchoStack) -> None:
    with ConverseClient(echo.addr) as client, pytest.raises(ClientConfigError, match="Opus"):
        client.converse([np.zeros(100, np.float32)], sample_rate=44100, encoding="opus")


def test_sdk_reports_gateway_rejection_of_bad_opus_bytes(echo: EchoStack) -> None:
    with pytest.raises(ConverseError) as err:
        _collect(echo.addr, [b"OggS" + bytes(100)], 24000, audio.OGG_OPUS)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moshi_grpc.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_converse_cli_encodings_files_and_bytes_per_second(echo: EchoStack, tmp_path) -> None:
    """`converse --encoding ...`: wav in -> Ogg Opus out (the reply stream as received),
    .opus in (sent as is) -> wav out, and G.711 telephony audio: wav in -> G.711 wav out. The
    JSON summary reports bytes per second both ways."""
    wav16 = tmp_path / "in16.wav"
    audio.write_wav(wav16, _bursts(16000, frames=12), 16000)
    out_opus = tmp_path / "reply.opus"
    proc = _cli(
        "converse", str(wav16), str(out_opus), "--addr", echo.addr, "--encoding", "opus",
        "--json", "--budget-ms", str(LOOSE),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    wire = summary["wire"]
    assert wire["encoding"] == "opus" and summary["frames"] == 12
    assert 0 < wire["sent_bytes_per_s"] < 16000 and 0 < wire["received_bytes_per_s"] < 16000
    assert out_opus.stat().st_size == wire["bytes_received"]
    y, rate = audio.read_opus(out_opus)
    assert rate in audio.OPUS_RATES  # the header's rate (sphn's writer names 48 kHz)
    _check_echo_pattern(y, rate, frames=12)

    # The .opus reply goes back in as is (no transcoding), decoded at that rate.
    out_wav = tmp_path / "again.wav"
    proc = _cli(
        "converse", str(out_opus), str(out_wav), "--addr", echo.addr, "--encoding", "opus",
        "--json", "--budget-ms", str(LOOSE),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["wire"]["bytes_sent"] == out_opus.stat().st_size
    y2, rate2 = audio.read_wav(out_wav)
    assert rate2 == rate and summary["frames"] >= 12 and len(y2) == summary["frames"] * rate // 12.5

    # Telephony: 8 kHz G.711 both ways; the reply is written as a G.711 wav.
    wav8 = tmp_path / "in8.wav"
    audio.write_wav(wav8, _bursts(8000, frames=12), 8000, audio.MULAW)
    out8 = tmp_path / "reply8.wav"
    proc = _cli(
        "converse", str(wav8), str(out8), "--addr", echo.addr, "--encoding", "mulaw",
        "--budget-ms", str(LOOSE),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wire (mulaw): sent 7680 bytes, 8000 B/s (64.0 kbit/s)" in proc.stdout, proc.stdout
    y, rate = audio.read_wav(out8)
    assert rate == 8000 and len(y) == 12 * 640
    assert out8.read_bytes()[20:22] == (7).to_bytes(2, "little")  # WAVE_FORMAT_MULAW
    _check_echo_pattern(y, rate, frames=12)


def test_async_sdk_opus_and_mixed_chunks_refused(echo: EchoStack) -> None:
    """The asyncio client codes arrays into one Ogg stream too; mixing bytes and arrays in an
    Ogg Opus session is refused before anything odd reaches the gateway."""
    import asyncio

    from moshi_grpc.clients import AsyncConverseClient

    rate = 24000
    x = _bursts(rate)

    async def main():
        async with AsyncConverseClient(echo.addr) as client:
            conv = client.converse_array(x, rate, encoding="opus", budget_ms=LOOSE, window_frames=3)
            return await conv.collect()

    result = asyncio.run(main())
    assert result.frames == 18 and result.summary.frames_dropped == 0
    assert result.data.startswith(b"OggS")
    _check_echo_pattern(result.audio, rate)
    with pytest.raises(ClientConfigError, match="not both"):
        _collect(echo.addr, [x[:1920], b"OggS"], rate, audio.OGG_OPUS)
