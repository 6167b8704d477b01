"""The client SDK (sync + asyncio) and the `converse` CLI against real loopback gRPC servers.

Two kinds of server:
- a scripted in-test `grpc.aio` Gateway servicer (a real server on 127.0.0.1:0) for what the
  real gateway should not be asked to do on demand: refuse a session start N times with a
  `retry-after-ms` hint, fail right after the start, hang past a deadline;
- the real services (`codec`, `lm` with `--model echo`, `gateway`), started as `moshi-grpc up`
  does, for end-to-end conversations through the SDK and the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest

from moshi_grpc import audio
from moshi_grpc.clients import (
    FLOW_CONTROL,
    NO_RETRY,
    REAL_TIME,
    AsyncConverseClient,
    AudioFrame,
    BudgetMissed,
    ClientConfigError,
    ConverseClient,
    ConverseError,
    RetryPolicy,
    SessionEnded,
    SessionOptions,
    SessionStarted,
    TextPiece,
    TlsOptions,
    chunk_array,
)
from moshi_grpc.clients.core import whole_signal_fields
from moshi_grpc.clients.latency import LatencyTracker
from moshi_grpc.clients.options import retry_after_ms
from moshi_grpc.v1 import gateway_pb2, gateway_pb2_grpc

RATE = 16000
FRAME = RATE * 80 // 1000  # 80 ms at 16 kHz


# --------------------------------------------------------------------------- scripted server


@dataclass
class Script:
    """What the scripted gateway does; `calls` records what it saw."""

    refuse: int = 0  # refuse this many session starts
    refuse_code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after_ms: int | None = None
    read_before_refuse: bool = True  # read one audio chunk before refusing
    fail_after_start: bool = False  # send SessionStarted, then UNAVAILABLE
    hang: bool = False  # start, then never answer (for deadlines)
    token: str | None = None  # required bearer token
    calls: int = 0
    received: list[bytes] = field(default_factory=list)  # audio of the last attempt
    configs: list[gateway_pb2.SessionConfig] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)


class ScriptedGateway(gateway_pb2_grpc.GatewayServicer):
    """Echo gateway: output frame t = input frame t, one text piece per frame."""

    def __init__(self, script: Script) -> None:
        self.s = script

    async def Converse(self, request_iterator, context):
        self.s.calls += 1
        try:
            async for resp in self._converse(request_iterator, context):
                yield resp
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away: grpc cancels the handler (CancelledError while awaiting,
            # GeneratorExit while suspended at a yield).
            self.s.cancelled.set()
            raise

    async def _converse(self, request_iterator, context):
        s = self.s
        if s.token is not None:
            md = dict(context.invocation_metadata())
            if md.get("authorization") != f"Bearer {s.token}":
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad or missing token")
        first = await request_iterator.__anext__()
        cfg = first.config
        s.configs.append(cfg)
        if s.calls <= s.refuse:
            if s.read_before_refuse:  # as a gateway may, so the client's resend is exercised
                await request_iterator.__anext__()
            if s.retry_after_ms is not None:
                context.set_trailing_metadata((("retry-after-ms", str(s.retry_after_ms)),))
            await context.abort(s.refuse_code, f"refused #{s.calls}")
        yield gateway_pb2.ConverseResponse(
            event=gateway_pb2.Event(
                started=gateway_pb2.SessionStarted(
                    session_id=f"s{s.calls}", sample_rate=cfg.sample_rate, budget_ms=200
                )
            )
        )
        if s.fail_after_start:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "backend failed")
        if s.hang:
            await asyncio.sleep(30)
        width = 2 if cfg.encoding == gateway_pb2.AUDIO_ENCODING_PCM16 else 4
        frame_bytes = cfg.sample_rate * 80 // 1000 * width
        s.received = []
        buf = b""
        t = 0
        async for req in request_iterator:
            s.received.append(req.audio.data)
            buf += req.audio.data
            while len(buf) >= frame_bytes:
                out, buf = buf[:frame_bytes], buf[frame_bytes:]
                yield gateway_pb2.ConverseResponse(
                    audio=gateway_pb2.AudioOut(frame_index=t, data=out)
                )
                yield gateway_pb2.ConverseResponse(
                    text=gateway_pb2.TextPiece(frame_index=t, text=f" w{t}")
                )
                t += 1
        yield gateway_pb2.ConverseResponse(
            event=gateway_pb2.Event(
                ended=gateway_pb2.SessionEnded(
                    summary=gateway_pb2.SessionSummary(
                        frames_in=t, frames_out=t, reason="client_closed"
                    )
                )
            )
        )


class ThreadedServer:
    """A grpc.aio server on its own event loop thread (usable from sync and async tests)."""

    def __init__(self, servicer, credentials: grpc.ServerCredentials | None = None) -> None:
        self._servicer = servicer
        self._creds = credentials
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._server = grpc.aio.server()
        gateway_pb2_grpc.add_GatewayServicer_to_server(self._servicer, self._server)
        if self._creds is None:
            self.port = self._server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self._server.add_secure_port("127.0.0.1:0", self._creds)
        await self._server.start()

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        assert self._ready.wait(10), "scripted server did not start"
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def scripted() -> Iterator[tuple[Script, ThreadedServer]]:
    script = Script()
    with ThreadedServer(ScriptedGateway(script)) as server:
        yield script, server


@pytest.fixture
async def scripted_here():
    """The scripted server on the test's own event loop (grpc.aio clients and servers must
    share one loop in a process: a client on another loop gets INTERNAL errors from core)."""
    script = Script()
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServicer_to_server(ScriptedGateway(script), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield script, f"127.0.0.1:{port}"
    await server.stop(0)


# A budget no loaded CI machine misses: tests that do not test the budget must not be refused
# by admission control because a busy 2-core machine made recent step times slow.
LOOSE = 5000

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


def _signal(seconds: float = 0.4, rate: int = RATE) -> np.ndarray:
    return audio.speech_like(seconds, rate, seed=3)


# --------------------------------------------------------------------------- unit pieces


def test_retry_policy_backoff_grows_caps_and_honours_hint() -> None:
    p = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2.0, jitter=0.2)
    rng = random.Random(0)
    delays = [p.delay_s(a, rng=rng) for a in range(1, 7)]
    for attempt, d in zip(range(1, 7), delays):
        base = min(0.5, 0.1 * 2 ** (attempt - 1))
        assert 0.8 * base <= d <= base
    assert delays[-1] <= 0.5
    # A pushback hint is the floor of the wait, whatever the exponential says.
    assert p.delay_s(1, retry_after_ms=1500, rng=rng) >= 1.5
    with pytest.raises(ClientConfigError):
        RetryPolicy(max_attempts=0)


def test_retry_after_parsing() -> None:
    assert retry_after_ms((("retry-after-ms", "250"),)) == 250
    assert retry_after_ms((("Retry-After-Ms", b"7"),)) == 7
    assert retry_after_ms((("retry-after-ms", "soon"),)) is None
    assert retry_after_ms(None) is None


def test_session_options_validate_and_build_config() -> None:
    with pytest.raises(ClientConfigError, match="sample_rate"):
        SessionOptions(sample_rate=4000)
    with pytest.raises(ClientConfigError, match="encoding"):
        SessionOptions(encoding="mp3")
    with pytest.raises(ClientConfigError, match="text_temperature"):
        SessionOptions(text_temperature=-1.0)
    req = SessionOptions(
        sample_rate=16000, encoding="float32", seed=7, budget_ms=150, text_temperature=0.0
    ).to_proto()
    cfg = req.config
    assert cfg.sample_rate == 16000 and cfg.encoding == gateway_pb2.AUDIO_ENCODING_FLOAT32
    assert cfg.HasField("seed") and cfg.seed == 7 and cfg.budget_ms == 150
    assert cfg.sampling.HasField("text_temperature") and cfg.sampling.text_temperature == 0.0
    assert not cfg.sampling.HasField("audio_temperature")
    assert not cfg.HasField("max_consecutive_misses")


def test_latency_tracker_maps_chunks_to_frames() -> None:
    now = [0.0]
    tr = LatencyTracker(16000, clock=lambda: now[0])
    tr.on_sent(1000)  # 0.78 frame
    now[0] = 0.1
    tr.on_sent(2000)  # 2.34 frames -> frames 0, 1 complete at t=0.1
    assert tr.frames_sent == 2
    now[0] = 0.25
    assert tr.on_frame(0) == pytest.approx(150.0)
    assert tr.on_frame(5) is None  # input not sent yet
    s = tr.stats()
    assert s.frames == 1 and s.first_audio_ms == pytest.approx(250.0)


# --------------------------------------------------------------------------- scripted server


def test_sync_retries_refused_start_and_resends_audio(scripted) -> None:
    script, server = scripted
    script.refuse, script.retry_after_ms = 2, 30
    signal = _signal()
    with ConverseClient(server.addr, retry=FAST_RETRY) as client:
        conv = client.converse_array(signal, RATE, chunk_ms=40)
        result = conv.collect()
    assert script.calls == 3 and result.attempts == 3
    # The hint (30 ms) is the floor of both waits even though the backoff asks for 10-20 ms.
    assert len(conv.retry_delays) == 2 and min(conv.retry_delays) >= 0.03
    # Every sample reached the server in the successful attempt (chunks pulled by the refused
    # attempts were sent again, none lost, none duplicated).
    sent = audio.encode_samples(signal, "pcm16")
    assert b"".join(script.received) == sent
    assert result.frames == len(signal) // FRAME
    assert result.started is not None and result.started.session_id == "s3"
    assert result.summary is not None and result.summary.reason == "client_closed"
    assert result.transcript.split() == [f"w{t}" for t in range(result.frames)]
    np.testing.assert_allclose(
        result.audio, audio.decode_samples(sent[: result.frames * FRAME * 2], "pcm16")
    )


def test_sync_gives_up_after_max_attempts_with_hint(scripted) -> None:
    script, server = scripted
    script.refuse, script.refuse_code, script.retry_after_ms = 99, grpc.StatusCode.UNAVAILABLE, 5
    with ConverseClient(server.addr, retry=FAST_RETRY) as client:
        with pytest.raises(ConverseError) as info:
            client.converse_array(_signal(), RATE).collect()
    err = info.value
    assert err.code == grpc.StatusCode.UNAVAILABLE and err.attempts == 4 and not err.started
    assert err.retry_after_ms == 5 and script.calls == 4


def test_sync_does_not_retry_other_codes_or_after_start(scripted) -> None:
    script, server = scripted
    script.refuse, script.refuse_code = 1, grpc.StatusCode.INVALID_ARGUMENT
    with ConverseClient(server.addr, retry=FAST_RETRY) as client:
        with pytest.raises(ConverseError) as info:
            client.converse_array(_signal(), RATE).collect()
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and script.calls == 1

    script.calls, script.refuse, script.fail_after_start = 0, 0, True
    seen = []
    with ConverseClient(server.addr, retry=FAST_RETRY) as client:
        with pytest.raises(ConverseError) as info:
            for ev in client.converse_array(_signal(), RATE):
                seen.append(ev)
    # UNAVAILABLE is retryable, but not once the session started: audio went through already.
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.started
    assert script.calls == 1 and isinstance(seen[0], SessionStarted)


def test_sync_deadline_and_early_break_cancel(scripted) -> None:
    script, server = scripted
    script.hang = True
    with ConverseClient(server.addr, retry=NO_RETRY, timeout=0.5) as client:
        with pytest.raises(ConverseError) as info:
            client.converse_array(_signal(), RATE).collect()
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    script.hang, script.cancelled = False, threading.Event()
    with ConverseClient(server.addr) as client:
        # An endless microphone-like source: leaving the loop must end the RPC.
        def endless():
            while True:
                yield np.zeros(FRAME, np.float32)

        for ev in client.converse(endless(), sample_rate=RATE):
            if isinstance(ev, AudioFrame) and ev.frame_index == 2:
                break
    assert script.cancelled.wait(5), "the server never saw the client's cancellation"


def test_token_is_sent_as_bearer_metadata(scripted) -> None:
    script, server = scripted
    script.token = "s3cret"
    with ConverseClient(server.addr, retry=NO_RETRY) as client:
        with pytest.raises(ConverseError) as info:
            client.converse_array(_signal(), RATE).collect()
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    with ConverseClient(server.addr, token="s3cret") as client:
        assert client.converse_array(_signal(), RATE).collect().frames == 5


def test_mtls_and_tls_options(tmp_path) -> None:
    from tls_certs import make_pki

    pki = make_pki(tmp_path)
    creds = grpc.ssl_server_credentials(
        [(pki.server.key_pem, pki.server.cert_pem)],
        root_certificates=pki.ca.cert_pem,
        require_client_auth=True,
    )
    with ThreadedServer(ScriptedGateway(Script()), creds) as server:
        addr = f"localhost:{server.port}"
        good = TlsOptions(
            root_ca=pki.path("ca.crt"),
            client_cert=pki.path("client.crt"),
            client_key=pki.path("client.key"),
        )
        with ConverseClient(addr, tls=good) as client:
            assert client.converse_array(_signal(), RATE).collect().frames == 5
        # No client certificate: the handshake fails -> UNAVAILABLE, after the retries.
        with ConverseClient(addr, tls=TlsOptions(root_ca=pki.path("ca.crt")), retry=NO_RETRY) as c:
            with pytest.raises(ConverseError) as info:
                c.converse_array(_signal(), RATE).collect()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ClientConfigError, match="together"):
        TlsOptions(client_cert=pki.path("client.crt")).credentials()


def test_float32_encoding_and_bad_chunks(scripted) -> None:
    script, server = scripted
    signal = _signal(0.24)
    with ConverseClient(server.addr) as client:
        result = client.converse_array(signal, RATE, encoding="float32").collect()
        assert script.configs[-1].encoding == gateway_pb2.AUDIO_ENCODING_FLOAT32
        np.testing.assert_array_equal(result.audio, signal[: 3 * FRAME])
        with pytest.raises(ClientConfigError, match="whole"):
            client.converse([b"\x00\x01\x02"], sample_rate=RATE).collect()
        with pytest.raises(ClientConfigError, match="NaN"):
            client.converse([np.full(10, np.nan, np.float32)], sample_rate=RATE).collect()


async def test_async_retries_and_events(scripted_here) -> None:
    script, addr = scripted_here
    # The async client holds audio back until the session started (see AsyncRetrySource).
    script.refuse, script.retry_after_ms, script.read_before_refuse = 1, 20, False
    signal = _signal()

    async def source():  # an async microphone-like source with odd chunk sizes
        for chunk in chunk_array(signal, RATE, chunk_ms=33):
            await asyncio.sleep(0)
            yield chunk

    async with AsyncConverseClient(addr, retry=FAST_RETRY) as client:
        conv = client.converse(source(), sample_rate=RATE, seed=5)
        events = [ev async for ev in conv]
    assert conv.attempts == 2 and script.calls == 2 and conv.retry_delays[0] >= 0.02
    assert script.configs[-1].seed == 5
    assert isinstance(events[0], SessionStarted) and isinstance(events[-1], SessionEnded)
    frames = [e for e in events if isinstance(e, AudioFrame)]
    assert [f.frame_index for f in frames] == list(range(len(signal) // FRAME))
    assert sum(isinstance(e, TextPiece) for e in events) == len(frames)
    assert b"".join(script.received) == audio.encode_samples(signal, "pcm16")
    assert conv.latency().frames == len(frames)


async def test_async_non_retryable_and_deadline(scripted_here) -> None:
    script, addr = scripted_here
    script.refuse, script.refuse_code = 5, grpc.StatusCode.PERMISSION_DENIED
    script.read_before_refuse = False
    async with AsyncConverseClient(addr, retry=FAST_RETRY) as client:
        with pytest.raises(ConverseError) as info:
            await client.converse_array(_signal(), RATE).collect()
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED and script.calls == 1
        script.refuse, script.hang = 0, True
        with pytest.raises(ConverseError) as info:
            await client.converse_array(_signal(), RATE, timeout=0.5).collect()
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


# --------------------------------------------------------------------------- real services


@dataclass
class LiveStack:
    """Real codec + LM + gateway servers on a background loop (what `moshi-grpc up` runs).

    `echo_addr`: gateway over the echo codec and echo LM (output frame t+1 = input frame t,
    quantised); `addr`: gateway over the echo codec and the small random LM (text pieces).
    """

    loop: object
    servers: list
    addr: str
    echo_addr: str
    metrics_urls: dict[str, str]


@pytest.fixture(scope="module")
def live() -> Iterator[LiveStack]:
    from svc_harness import LoopThread

    from moshi_grpc.services.codec.engine import CodecOptions
    from moshi_grpc.services.codec.startup import start_codec_server
    from moshi_grpc.services.common.server import ServerConfig
    from moshi_grpc.services.gateway.cli import start_gateway
    from moshi_grpc.services.gateway.config import GatewaySettings
    from moshi_grpc.services.lm.engine import LmOptions
    from moshi_grpc.services.lm.startup import start_lm_server

    def cfg() -> ServerConfig:
        return ServerConfig(host="127.0.0.1", port=0, metrics_port=0)

    async def start():
        codec = await start_codec_server(
            cfg(), CodecOptions(model="echo", max_sessions=8, max_wait_ms=0.0)
        )
        # the plain LM (forms pinned off): runs are compared token for token, and "auto"
        # would pick kernels by timing at load (equal only to float rounding)
        options = LmOptions(
            model="real", config="small", max_sessions=4, max_wait_ms=0.0, cpu_forms="off"
        )
        lm = await start_lm_server(cfg(), options)
        echo_lm = await start_lm_server(
            cfg(), LmOptions(model="echo", max_sessions=4, max_wait_ms=0.0)
        )
        settings = GatewaySettings(refresh_interval_s=0.1)
        gw = await start_gateway(cfg(), codec.address, lm.address, settings)
        echo_gw = await start_gateway(cfg(), codec.address, echo_lm.address, settings)
        return [codec, lm, echo_lm, gw, echo_gw]

    loop = LoopThread()
    servers = loop.run(start(), timeout=120)
    codec, lm, _, gw, echo_gw = servers
    try:
        yield LiveStack(
            loop=loop,
            servers=servers,
            addr=gw.address,
            echo_addr=echo_gw.address,
            metrics_urls={
                "codec": codec.metrics_url,
                "lm": lm.metrics_url,
                "gateway": gw.server.metrics_url,
            },
        )
    finally:

        async def stop():
            for s in reversed(servers):
                await s.stop(0)

        loop.run(stop(), timeout=60)
        loop.close()


def _expected_echo(x24: np.ndarray, frames: int) -> np.ndarray:
    """What the echo codec + echo LM return: frame t+1 = input frame t, sample-and-held."""
    out = np.zeros(frames * 1920, np.float32)
    for t in range(frames - 1):
        held = np.repeat(x24[t * 1920 : (t + 1) * 1920 : 240], 240)
        out[(t + 1) * 1920 : (t + 2) * 1920] = held
    return out


def test_sync_sdk_end_to_end_echo_alignment(live: LiveStack) -> None:
    """Through the real gateway: output frame t answers input frame t, content checked."""
    x = _signal(0.8, 24000)
    with ConverseClient(live.echo_addr) as client:
        client.wait_ready(10)
        conv = client.converse_array(
            x, 24000, chunk_ms=50, window_frames=3, client_id="t", budget_ms=LOOSE
        )
        result = conv.collect()
    assert result.frames == 10 and result.sample_rate == 24000
    assert result.summary is not None and result.summary.frames_in == 10
    assert result.summary.frames_dropped == 0 and result.budget_misses == 0
    assert result.started is not None and result.started.lm_replica
    np.testing.assert_allclose(result.audio, _expected_echo(x, 10), atol=3e-3)
    assert result.latency.frames == 10 and result.latency.p50_ms > 0


def test_sync_sdk_text_pieces_from_small_lm(live: LiveStack) -> None:
    """Text pieces from the small random LM; a seed and greedy text make replies repeatable."""
    x = _signal(2.0, 16000)
    runs = []
    with ConverseClient(live.addr) as client:
        for _ in range(2):
            conv = client.converse_array(
                x, 16000, seed=3, text_temperature=0.0, window_frames=4, budget_ms=LOOSE
            )
            runs.append(list(conv))
    events = runs[0]
    frames = [e for e in events if isinstance(e, AudioFrame)]
    texts = [e for e in events if isinstance(e, TextPiece)]
    assert isinstance(events[0], SessionStarted) and isinstance(events[-1], SessionEnded)
    assert events[0].model.startswith("moshi-lm/")
    assert [f.frame_index for f in frames] == list(range(25))
    assert all(len(f.samples) == 1280 for f in frames)  # 80 ms at 16 kHz
    assert texts and all(0 <= p.frame_index < 25 and p.text for p in texts)
    again = [e for e in runs[1] if isinstance(e, TextPiece)]
    assert [(p.frame_index, p.text) for p in again] == [(p.frame_index, p.text) for p in texts]


def test_async_sdk_end_to_end(live: LiveStack) -> None:
    """asyncio client on the servers' loop: float32 at 48 kHz, real-time paced."""
    x = _signal(0.48, 48000)

    async def go():
        async with AsyncConverseClient(live.echo_addr) as client:
            await client.wait_ready(10)
            conv = client.converse_array(
                x, 48000, realtime=True, encoding="float32", budget_ms=LOOSE
            )
            return await conv.collect()

    result = live.loop.run(go(), timeout=60)
    assert result.frames == 6 and len(result.audio) == 6 * 3840
    assert result.summary is not None and result.summary.reason
    assert result.attempts == 1 and result.frames_dropped == 0


def test_readme_headline_example_sync_and_async(live: LiveStack, tmp_path) -> None:
    """The README's SDK example, as written (plus a budget no loaded CI machine misses):
    `converse_wav(..., realtime=True, seed=42)` iterated for AudioFrame / TextPiece events,
    then `converse_array(samples, 16000, window_frames=4).collect()`; and its asyncio twin.
    The same file and seed give the same text pieces through both clients."""
    samples = _signal(1.0, 16000)
    question = tmp_path / "question.wav"
    audio.write_wav(question, samples, 16000)
    frames = 13  # 1 s at 16 kHz: 12.5 frames, the last one padded

    played, printed = [], []
    with ConverseClient(live.addr, token=None) as client:
        for event in client.converse_wav(question, realtime=True, seed=42, budget_ms=LOOSE):
            if isinstance(event, AudioFrame):
                played.append(event.samples)
            elif isinstance(event, TextPiece):
                printed.append((event.frame_index, event.text))
        result = client.converse_array(samples, 16000, window_frames=4, budget_ms=LOOSE).collect()
    assert len(played) == frames
    assert all(p.dtype == np.float32 and len(p) == 1280 for p in played)  # the file's rate
    assert printed, "the small random LM wrote no text"
    assert result.frames == frames and len(result.audio) == frames * 1280
    own_text = "".join(e.text for e in result.events if isinstance(e, TextPiece))
    assert result.transcript == own_text.strip()
    assert result.summary is not None and result.summary.latency_p99_ms > 0

    async def twin():
        out = []
        async with AsyncConverseClient(live.addr) as client:
            conv = client.converse_wav(question, realtime=True, seed=42, budget_ms=LOOSE)
            async for event in conv:
                if isinstance(event, TextPiece):
                    out.append((event.frame_index, event.text))
        return out

    assert live.loop.run(twin(), timeout=60) == printed


def test_refusal_from_real_gateway_is_retried_then_reported(live: LiveStack) -> None:
    """More sessions than LM slots: the extra one is refused with a retry hint."""
    from moshi_grpc.v1 import common_pb2  # noqa: F401 - proto import order

    held = []
    with ConverseClient(live.echo_addr, retry=RetryPolicy(max_attempts=2)) as client:
        gate = threading.Event()

        def silence():
            yield np.zeros(1920, np.float32)
            gate.wait(20)

        try:
            for _ in range(4):  # echo LM has 4 slots
                conv = client.converse(silence(), sample_rate=24000, budget_ms=LOOSE)
                it = iter(conv)
                assert isinstance(next(it), SessionStarted)
                held.append((conv, it))
            with pytest.raises(ConverseError) as info:
                client.converse(
                    iter([np.zeros(1920, np.float32)]), sample_rate=24000, budget_ms=LOOSE
                ).collect()
            err = info.value
            assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not err.started
            assert err.attempts == 2 and err.retry_after_ms and err.retry_after_ms > 0
        finally:
            gate.set()
            for conv, _ in held:
                conv.cancel()


def test_sdk_mtls_and_token_against_real_gateway(live: LiveStack, tmp_path) -> None:
    """The real gateway with mTLS and a bearer token: the SDK's options get through; a
    missing token is UNAUTHENTICATED at once (not retried)."""
    from tls_certs import make_pki

    from moshi_grpc.services.common.server import ServerConfig
    from moshi_grpc.services.gateway.cli import start_gateway
    from moshi_grpc.services.gateway.config import GatewaySettings

    pki = make_pki(tmp_path)
    codec, _, echo_lm = live.servers[:3]
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        tls_cert=str(pki.path("server.crt")),
        tls_key=str(pki.path("server.key")),
        tls_client_ca=str(pki.path("ca.crt")),
        auth_token="t0ken",
    )
    gw = live.loop.run(
        start_gateway(
            config, codec.address, echo_lm.address, GatewaySettings(refresh_interval_s=0.1)
        )
    )
    try:
        addr = f"localhost:{gw.server.port}"
        tls = TlsOptions(
            root_ca=pki.path("ca.crt"),
            client_cert=pki.path("client.crt"),
            client_key=pki.path("client.key"),
        )
        x = _signal(0.24, 24000)
        with ConverseClient(addr, tls=tls, token="t0ken") as client:
            result = client.converse_array(x, 24000, window_frames=2, budget_ms=LOOSE).collect()
        assert result.frames == 3 and result.summary is not None
        with ConverseClient(addr, tls=tls, retry=FAST_RETRY) as client:
            with pytest.raises(ConverseError) as info:
                client.converse_array(x, 24000).collect()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and info.value.attempts == 1
        rogue = TlsOptions(
            root_ca=pki.path("ca.crt"),
            client_cert=pki.path("rogue-client.crt"),
            client_key=pki.path("rogue-client.key"),
        )
        with ConverseClient(addr, tls=rogue, token="t0ken", retry=NO_RETRY) as client:
            with pytest.raises(ConverseError) as info:
                client.converse_array(x, 24000).collect()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE  # handshake refused
    finally:
        live.loop.run(gw.stop(0))


@contextlib.contextmanager
def _slow_lm_stack(live: LiveStack, lm_delay_ms: float) -> Iterator[str]:
    """Fresh echo backends (no step-time history from earlier tests for admission to refuse
    on) with an LM that takes `lm_delay_ms` per step, and a gateway; yields its address."""
    from moshi_grpc.services.codec.engine import CodecOptions
    from moshi_grpc.services.codec.startup import start_codec_server
    from moshi_grpc.services.common.server import ServerConfig
    from moshi_grpc.services.gateway.cli import start_gateway
    from moshi_grpc.services.gateway.config import GatewaySettings
    from moshi_grpc.services.lm.engine import LmOptions
    from moshi_grpc.services.lm.startup import start_lm_server

    async def start():
        cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=None)
        codec = await start_codec_server(cfg, CodecOptions(model="echo", max_sessions=2))
        options = LmOptions(
            model="echo", max_sessions=2, max_wait_ms=0.0, inject_delay_ms=lm_delay_ms
        )
        lm = await start_lm_server(cfg, options)
        gw = await start_gateway(
            cfg, codec.address, lm.address, GatewaySettings(refresh_interval_s=0.1)
        )
        return codec, lm, gw

    async def stop(servers):
        for server in servers:
            await server.stop(0)

    codec, lm, gw = live.loop.run(start())
    try:
        yield gw.address
    finally:
        live.loop.run(stop((gw, lm, codec)))


def test_sdk_reports_budget_misses_and_deadline_end(live: LiveStack) -> None:
    """A slow LM (the service's own --inject-delay-ms): typed BudgetMissed events, the summary,
    then DEADLINE_EXCEEDED as a ConverseError marked started (never retried)."""
    events = []
    with _slow_lm_stack(live, lm_delay_ms=150) as gateway_address:
        with ConverseClient(gateway_address, retry=FAST_RETRY) as client:
            conv = client.converse_array(
                _signal(2.0, 16000), 16000, realtime=True, chunk_ms=20,
                budget_ms=100, max_consecutive_misses=3,
            )  # fmt: skip
            with pytest.raises(ConverseError) as info:
                for ev in conv:
                    events.append(ev)
    err = info.value
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.started and err.attempts == 1
    misses = [e for e in events if isinstance(e, BudgetMissed)]
    assert len(misses) >= 3 and misses[-1].consecutive == 3 and misses[-1].late_ms > 0
    assert isinstance(events[-1], SessionEnded)
    assert events[-1].summary.reason == "deadline_exceeded" and conv.summary is not None
    assert conv.summary.frames_late >= 3


def test_whole_files_stream_as_pre_recorded_audio_without_misses(
    live: LiveStack, scripted, tmp_path
) -> None:
    """`converse_array` / `converse_wav` / `converse FILE` sent faster than real time ask for
    FLOW_CONTROL (checked on the wire, at a scripted gateway); paced at real time they stay
    REAL_TIME. The real gateway then takes a file at its own pace: every frame back, none
    dropped, none late, with an LM that takes 100 ms a step (frames queue behind each
    other). The budget is one no frame misses on any machine: that queueing behind one's own
    frames is not a miss is a fake-clock test (test_gateway_budget.py,
    test_flow_controlled_frames_do_not_wait_on_their_own_session_against_the_budget)."""
    import argparse

    from moshi_grpc.clients import cli as client_cli

    script, server = scripted
    wav = tmp_path / "in.wav"
    audio.write_wav(wav, _signal(0.24), RATE)
    wire = gateway_pb2.INPUT_PACING_FLOW_CONTROL, gateway_pb2.INPUT_PACING_REAL_TIME
    with ConverseClient(server.addr) as client:
        for realtime, expected in ((False, wire[0]), (True, wire[1])):
            client.converse_array(_signal(0.24), RATE, realtime=realtime).collect()
            assert script.configs[-1].input_pacing == expected, realtime
            client.converse_wav(wav, realtime=realtime).collect()
            assert script.configs[-1].input_pacing == expected, realtime

    with _slow_lm_stack(live, lm_delay_ms=100) as gateway_address:
        with ConverseClient(gateway_address, retry=FAST_RETRY) as client:
            conv = client.converse_array(
                _signal(1.2, 16000), 16000, budget_ms=10_000, window_frames=4
            )
            assert conv.session.input_pacing == FLOW_CONTROL
            result = conv.collect()
    summary = result.summary
    assert summary.reason == "client_closed" and summary.frames_out == 15
    assert summary.frames_late == 0 and summary.frames_dropped == 0
    assert not [e for e in result.events if isinstance(e, BudgetMissed)]
    # The CLI and the other entry points choose the same way.
    parser = argparse.ArgumentParser()
    client_cli.add_arguments(parser)
    for argv, pacing in (([], FLOW_CONTROL), (["--realtime"], REAL_TIME)):
        args = parser.parse_args(["in.wav", "out.wav", *argv])
        assert client_cli._session(args, 16000).input_pacing == pacing
    assert whole_signal_fields(True, {})["input_pacing"] == REAL_TIME
    assert whole_signal_fields(False, {"input_pacing": REAL_TIME})["input_pacing"] == REAL_TIME
    with pytest.raises(ClientConfigError, match="input_pacing must be one of"):
        SessionOptions(input_pacing="asap")
    config = SessionOptions(input_pacing=FLOW_CONTROL).to_proto().config
    assert config.input_pacing == gateway_pb2.INPUT_PACING_FLOW_CONTROL
    assert not SessionOptions().to_proto().config.input_pacing  # the gateway's default


# --------------------------------------------------------------------------- CLI and probe


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed console script's code path: `python -m moshi_grpc.cli ...`."""
    return subprocess.run(
        [sys.executable, "-m", "moshi_grpc.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_converse_cli_writes_reply_transcript_and_summary(live: LiveStack, tmp_path) -> None:
    """A 10.5 s file (long enough for progress lines) through the real gateway."""
    src = tmp_path / "in.wav"
    x = audio.speech_like(10.5, 16000, seed=3)
    audio.write_wav(src, x, 16000)
    out, transcript = tmp_path / "out.wav", tmp_path / "out.txt"
    proc = _cli(
        "converse", str(src), str(out), "--addr", live.addr, "--transcript", str(transcript),
        "--seed", "3", "--text-temperature", "0", "--json", "--budget-ms", str(LOOSE),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    y, rate = audio.read_wav(out)
    frames = math.ceil(10.5 / 0.08)
    assert rate == 16000 and len(y) == frames * 1280
    assert summary["frames"] == frames and summary["frames_dropped"] == 0
    assert summary["input_pacing"] == FLOW_CONTROL  # a file, not paced: pre-recorded audio
    assert summary["end_reason"] == "client_closed" and summary["model"].startswith("moshi-lm/")
    assert summary["client_latency_ms"]["p50"] > 0 and summary["gateway_latency_ms"]["p99"] > 0
    text = transcript.read_text().strip()
    assert text and len(text) == summary["transcript_chars"]
    # Progress on long files: a line every 5 s of reply audio.
    assert proc.stderr.count("%), ") == 2, proc.stderr


def test_converse_cli_realtime_human_summary(live: LiveStack, tmp_path) -> None:
    src = tmp_path / "in.wav"
    audio.write_wav(src, audio.speech_like(0.8, 24000, seed=1), 24000, audio.FLOAT32)
    from moshi_grpc.cli import main

    out = tmp_path / "out.wav"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(
            ["converse", str(src), str(out), "--addr", live.echo_addr, "--realtime",
             "--encoding", "float32", "--budget-ms", "5000"]
        )  # fmt: skip
    assert rc == 0
    text = buf.getvalue()
    assert "latency per frame (client): p50" in text and "budget 5000 ms" in text
    y, rate = audio.read_wav(out)
    assert rate == 24000 and len(y) == 10 * 1920
    assert "frames 10 out" in text


def test_converse_cli_errors(tmp_path, free_port) -> None:
    missing = _cli("converse", str(tmp_path / "nope.wav"), str(tmp_path / "o.wav"))
    assert missing.returncode == 2 and "nope.wav" in missing.stderr
    src = tmp_path / "in.wav"
    audio.write_wav(src, np.zeros(2400, np.float32), 24000)
    down = _cli(
        "converse", str(src), str(tmp_path / "o.wav"), "--addr", f"127.0.0.1:{free_port}",
        "--retries", "1", "--timeout", "5",
    )  # fmt: skip
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_health_probe(live: LiveStack, free_port) -> None:
    from moshi_grpc.clients import health_probe

    assert health_probe.main(["--addr", live.addr, "-q"]) == health_probe.OK
    assert (
        health_probe.main(["--addr", live.addr, "--service", "moshi_grpc.v1.Gateway", "-q"])
        == health_probe.OK
    )
    gw = live.servers[3]
    live.loop.run(gw.server.health.set("probe.test", 2))  # NOT_SERVING
    assert health_probe.main(["--addr", live.addr, "--service", "probe.test", "-q"]) == 1
    proc = subprocess.run(
        [sys.executable, "-m", "moshi_grpc.clients.health_probe", "--addr",
         f"127.0.0.1:{free_port}", "--timeout", "1"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == health_probe.UNREACHABLE and "UNAVAILABLE" in proc.stderr


@pytest.mark.slow
def test_converse_cli_against_moshi_grpc_up(tmp_path, free_port_factory) -> None:
    """The console script end to end: `moshi-grpc up` (three processes) + `moshi-grpc converse`."""
    import signal
    import time

    from moshi_grpc.clients import health_probe

    gw, codec, lm = (free_port_factory() for _ in range(3))
    # /metrics on free ports (metrics port 0), not the fixed 9091-9093 another run may hold
    up = subprocess.Popen(
        [sys.executable, "-m", "moshi_grpc.cli", "up", "--model", "echo",
         "--gateway-port", str(gw), "--codec-port", str(codec), "--lm-port", str(lm),
         "--gateway-metrics-port", "0", "--codec-metrics-port", "0", "--lm-metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while health_probe.check(f"127.0.0.1:{gw}", timeout_s=1.0)[0] != health_probe.OK:
            assert up.poll() is None, up.stdout.read()
            if time.monotonic() > deadline:  # a hang guard, not a timing assertion
                pytest.fail("moshi-grpc up did not become ready within 120 s")
            time.sleep(0.3)
        src, out = tmp_path / "in.wav", tmp_path / "out.wav"
        audio.write_wav(src, audio.speech_like(1.0, 16000, seed=2), 16000)
        proc = _cli(
            "converse", str(src), str(out), "--addr", f"127.0.0.1:{gw}", "--json",
            "--budget-ms", str(LOOSE),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["frames"] == 13 and summary["end_reason"] == "client_closed"
        y, rate = audio.read_wav(out)
        assert rate == 16000 and len(y) == 13 * 1280
        # Every wire encoding round-trips through `up --model echo`; bytes per second reported.
        for encoding, out_name, width in (
            ("float32", "out.wav", 4), ("mulaw", "out.wav", 1), ("alaw", "out.wav", 1),
            ("opus", "out.opus", None),
        ):  # fmt: skip
            out = tmp_path / out_name
            proc = _cli(
                "converse", str(src), str(out), "--addr", f"127.0.0.1:{gw}", "--json",
                "--budget-ms", str(LOOSE), "--encoding", encoding,
            )  # fmt: skip
            assert proc.returncode == 0, (encoding, proc.stderr)
            summary = json.loads(proc.stdout)
            assert summary["frames"] == 13 and summary["end_reason"] == "client_closed"
            wire = summary["wire"]
            if width is None:
                assert 0 < wire["received_bytes_per_s"] < 16000 * 2 / 4
                assert out.read_bytes().startswith(b"OggS")
            else:
                assert wire["received_bytes_per_s"] == 16000 * width
                assert len(audio.read_wav(out)[0]) == 13 * 1280
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(10)


def test_async_status_recovery_from_summary() -> None:
    """grpc.aio's INTERNAL-after-final-status bug (grpc/grpc#36066) is undone via the summary."""
    from moshi_grpc.clients.async_client import _recover_status
    from moshi_grpc.clients.events import SessionSummary

    def err(code, details):
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    ended = SessionSummary(10, 10, 3, 0, 1.0, 2.0, 3.0, 1.0, "deadline_exceeded")
    internal = err(grpc.StatusCode.INTERNAL, "Internal error from Core")
    assert _recover_status(internal, ended)[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _recover_status(internal, None)[0] == grpc.StatusCode.INTERNAL
    real = err(grpc.StatusCode.INTERNAL, "model crashed")
    assert _recover_status(real, ended) == (grpc.StatusCode.INTERNAL, "model crashed")
