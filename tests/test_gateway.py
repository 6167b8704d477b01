"""The session gateway on real loopback servers: codec, LM and gateway (grpc.aio, port 0).

Backends run in `--model echo` mode (zero cost, exactly predictable: output frame t+1 is the
quantised input frame t) or with the small random LM for text pieces; slow backends use the
services' own `inject_delay_ms` option. Nothing mocks the transport.
"""

from __future__ import annotations

import asyncio
import functools
import math
import sys
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from svc_harness import metric_value, scrape

from moshi_grpc import audio
from moshi_grpc.services.codec.engine import CodecOptions
from moshi_grpc.services.codec.startup import start_codec_server
from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.services.gateway.cli import start_gateway
from moshi_grpc.services.gateway.config import GatewaySettings
from moshi_grpc.services.lm.engine import LmOptions, load_lm_model
from moshi_grpc.services.lm.startup import start_lm_server
from moshi_grpc.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

PCM16 = gateway_pb2.AUDIO_ENCODING_PCM16
FLOAT32 = gateway_pb2.AUDIO_ENCODING_FLOAT32


def _cfg(metrics: bool = False) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=0 if metrics else None)


@dataclass
class Stack:
    codec: object
    lm: object
    gateway: object
    channel: grpc.aio.Channel
    stub: gateway_pb2_grpc.GatewayStub
    extra: list = field(default_factory=list)

    async def close(self) -> None:
        await self.channel.close()
        await self.gateway.stop(0)
        for s in (self.codec, self.lm, *self.extra):
            await s.stop(0)


# Every test here runs with both backend stream modes (gateway/streams.py): the shared
# multiplexed streams (the default) and one stream per session and stage.
_MODE = {"backend_streams": "mux"}


@pytest.fixture(autouse=True, params=["mux", "per-session"])
def backend_streams(request):
    _MODE["backend_streams"] = request.param
    yield request.param
    _MODE["backend_streams"] = "mux"


@functools.cache
def _small_lm():
    """The small random LM and its bundled tokenizer, built once for the whole module; the
    plain model (forms pinned off), not kernels picked by timing at load."""
    return load_lm_model(LmOptions(model="real", config="small", cpu_forms="off"))


async def start_stack(
    *,
    lm_model: str = "echo",
    lm_slots: int = 8,
    codec_slots: int = 16,
    lm_delay_ms: float = 0.0,
    settings: GatewaySettings | None = None,
    metrics: bool = False,
) -> Stack:
    codec = await start_codec_server(
        _cfg(), CodecOptions(model="echo", max_sessions=codec_slots, max_wait_ms=0.0)
    )
    options = LmOptions(
        model=lm_model,
        config="small",
        max_sessions=lm_slots,
        inject_delay_ms=lm_delay_ms,
        max_wait_ms=0.0,
    )
    loader = _small_lm if lm_model == "real" else None
    lm = await start_lm_server(_cfg(), options, load_model=loader)
    settings = settings or GatewaySettings(refresh_interval_s=0.1)
    settings.backend_streams = _MODE["backend_streams"]
    gateway = await start_gateway(_cfg(metrics), codec.address, lm.address, settings)
    channel = grpc.aio.insecure_channel(gateway.address)
    return Stack(codec, lm, gateway, channel, gateway_pb2_grpc.GatewayStub(channel))


@dataclass
class Reply:
    events: list = field(default_factory=list)  # Event messages in order
    audio: list = field(default_factory=list)  # AudioOut in order
    text: list = field(default_factory=list)  # TextPiece in order
    kinds: list = field(default_factory=list)  # order of everything
    code: grpc.StatusCode | None = None
    details: str = ""
    trailing: dict = field(default_factory=dict)

    def event(self, kind: str) -> list:
        return [getattr(e, kind) for e in self.events if e.WhichOneof("kind") == kind]


def config_msg(rate: int, encoding: int, **kw) -> gateway_pb2.ConverseRequest:
    return gateway_pb2.ConverseRequest(
        config=gateway_pb2.SessionConfig(sample_rate=rate, encoding=encoding, **kw)
    )


def audio_msgs(x: np.ndarray, encoding: int, chunk_sizes) -> list[gateway_pb2.ConverseRequest]:
    enc = audio.PCM16 if encoding == PCM16 else audio.FLOAT32
    out, pos, i = [], 0, 0
    while pos < len(x):
        n = chunk_sizes[i % len(chunk_sizes)]
        out.append(
            gateway_pb2.ConverseRequest(
                audio=gateway_pb2.AudioChunk(data=audio.encode_samples(x[pos : pos + n], enc))
            )
        )
        pos += n
        i += 1
    return out


async def converse(
    stub, requests, *, pace_s: float = 0.0, speed: float = 0.0, timeout: float = 30.0
) -> Reply:
    """Send `requests`, collect every reply and the status. Audio chunks are paced by
    `pace_s` each, or at `speed` times real time (then the first message must be a config)."""
    reply = Reply()
    rate = requests[0].config.sample_rate if requests[0].HasField("config") else 0
    width = 2 if requests[0].config.encoding == PCM16 else 4

    async def gen():
        for i, r in enumerate(requests):
            yield r
            if not i:
                continue
            if speed and rate:
                await asyncio.sleep(len(r.audio.data) / width / rate / speed)
            elif pace_s:
                await asyncio.sleep(pace_s)

    call = stub.Converse(gen(), timeout=timeout)
    try:
        async for msg in call:
            kind = msg.WhichOneof("kind")
            reply.kinds.append(kind)
            if kind == "event":
                reply.events.append(msg.event)
            elif kind == "audio":
                reply.audio.append(msg.audio)
            else:
                reply.text.append(msg.text)
        reply.code = await call.code()
    except grpc.aio.AioRpcError as exc:
        reply.code = exc.code()
        reply.details = exc.details() or ""
        reply.trailing = {k: v for k, v in (exc.trailing_metadata() or ())}
    return reply


def _check_complete_conversation(reply: Reply, rate: int, width: int, frames: int) -> None:
    assert reply.code == grpc.StatusCode.OK, reply.details
    assert reply.kinds[0] == "event" and reply.events[0].WhichOneof("kind") == "started"
    assert reply.kinds[-1] == "event" and reply.events[-1].WhichOneof("kind") == "ended"
    started = reply.events[0].started
    assert started.sample_rate == rate and started.session_id
    assert [a.frame_index for a in reply.audio] == list(range(frames))
    for a in reply.audio:
        assert len(a.data) == audio.frame_samples_at(rate, a.frame_index) * width
    summary = reply.events[-1].ended.summary
    assert summary.frames_in == summary.frames_out == frames
    assert summary.frames_late == 0 and summary.frames_dropped == 0
    assert summary.latency_frames == frames  # the percentiles cover every frame
    assert summary.reason == "client_closed"
    assert 0 < summary.latency_p50_ms <= summary.latency_p95_ms <= summary.latency_p99_ms


@pytest.mark.parametrize(
    ("rate", "encoding", "width"),
    [(16000, PCM16, 2), (48000, FLOAT32, 4)],
    ids=["16k-pcm16", "48k-float32"],
)
async def test_conversation_from_wav_has_right_length_rate_and_text(
    tmp_path, rate: int, encoding: int, width: int
) -> None:
    """A wav in, a reply of exactly one frame per input frame at the client's rate, text
    pieces from the (small, random) LM, every frame accounted for in the summary.

    Sent as pre-recorded audio (INPUT_PACING_FLOW_CONTROL: nothing dropped, each frame's
    clock starts when it is taken) against a budget no frame misses on any machine that
    runs the suite: what is checked is the framing, not this machine's speed."""
    seconds = 1.25  # 30000 samples at 24 kHz: 15 full frames + a partial one (padded)
    path = tmp_path / "in.wav"
    audio.write_wav(path, audio.speech_like(seconds, rate, seed=4), rate, audio.FLOAT32)
    x, file_rate = audio.read_wav(path)
    assert file_rate == rate
    stack = await start_stack(lm_model="real")
    try:
        requests = [
            config_msg(
                rate,
                encoding,
                seed=7,
                budget_ms=10_000,
                max_consecutive_misses=0,
                input_pacing=gateway_pb2.INPUT_PACING_FLOW_CONTROL,
            )
        ]
        requests += audio_msgs(x, encoding, [997, 160, 4000])
        reply = await converse(stack.stub, requests)
    finally:
        await stack.close()
    frames = math.ceil(seconds * 24000 / 1920)
    _check_complete_conversation(reply, rate, width, frames)
    out_samples = sum(len(a.data) for a in reply.audio) // width
    assert out_samples == frames * 1920 * rate // 24000
    assert reply.events[0].started.model.startswith("moshi-lm")
    # Text pieces arrive as soon as decoded, tagged with the frame that produced them.
    assert reply.text, "the small random LM should have produced some text pieces"
    assert all(p.text and 0 <= p.frame_index < frames for p in reply.text)
    # Pieces are sent as soon as the LM step is back: before that frame's audio.
    seen_audio = -1
    text_iter = iter(reply.text)
    audio_iter = iter(reply.audio)
    for kind in reply.kinds:
        if kind == "audio":
            seen_audio = next(audio_iter).frame_index
        elif kind == "text":
            assert next(text_iter).frame_index > seen_audio


async def test_frame_t_maps_to_frame_t_exactly() -> None:
    """Echo backends: output frame t+1 is input frame t quantised (LM delay 1); frame 0 is
    initial-delay silence. At 24 kHz there is no resampling, so the check is exact.

    Deterministic whatever the machine's speed: the audio is sent as fast as gRPC takes it,
    with INPUT_PACING_FLOW_CONTROL (the gateway reads a frame only when it has room at the
    backends: no frame can be dropped) and a budget no frame can miss on any machine that
    runs the suite (10 s, misses never end the session)."""
    rng = np.random.default_rng(0)
    frames = 12
    levels = rng.uniform(-0.9, 0.9, size=(frames, 8)).astype(np.float32)
    x = np.repeat(levels, 240, axis=1).reshape(-1)  # frame t, segment k = levels[t, k]
    stack = await start_stack()
    try:
        config = config_msg(
            24000,
            FLOAT32,
            budget_ms=10_000,
            max_consecutive_misses=0,
            input_pacing=gateway_pb2.INPUT_PACING_FLOW_CONTROL,
        )
        requests = [config] + audio_msgs(x, FLOAT32, [1000, 3000, 500])
        reply = await converse(stack.stub, requests)
    finally:
        await stack.close()
    _check_complete_conversation(reply, 24000, 4, frames)
    assert reply.audio[0].silence and not np.frombuffer(reply.audio[0].data, "<f4").any()
    for t in range(1, frames):
        out = np.frombuffer(reply.audio[t].data, "<f4").reshape(8, 240)
        assert not reply.audio[t].silence
        expected = np.floor((levels[t - 1] + 1.0) * 1024) / 1024 - 1.0
        np.testing.assert_allclose(out, np.repeat(expected[:, None], 240, axis=1), atol=1e-6)


async def test_slow_backend_misses_become_silence_then_deadline_exceeded() -> None:
    settings = GatewaySettings(refresh_interval_s=0.1)
    stack = await start_stack(lm_delay_ms=150.0, settings=settings, metrics=True)
    try:
        x = audio.speech_like(3.0, 24000, seed=1)
        requests = [
            config_msg(24000, FLOAT32, budget_ms=60, max_consecutive_misses=3)
        ] + audio_msgs(x, FLOAT32, [1920])
        reply = await converse(stack.stub, requests, pace_s=0.08)
        metrics = scrape(stack.gateway.server.metrics_url)
    finally:
        await stack.close()
    assert reply.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "consecutive" in reply.details and "60 ms" in reply.details
    misses = reply.event("budget_missed")
    assert [m.consecutive for m in misses][:3] == [1, 2, 3]
    assert all(m.late_ms >= 0 for m in misses)
    missed = {m.frame_index for m in misses}
    for a in reply.audio:
        if a.frame_index in missed:
            assert a.silence and not np.frombuffer(a.data, "<f4").any()
    summary = reply.event("ended")[-1].summary
    assert summary.reason == "deadline_exceeded"
    assert summary.frames_late == len(misses) >= 3
    assert reply.kinds[-1] == "event"  # the summary is the last message before the status
    assert metric_value(metrics, "moshi_gateway_budget_misses_total") >= 3
    assert metric_value(metrics, "moshi_gateway_frames_dropped_total", reason="budget") >= 3
    assert (
        metric_value(metrics, "moshi_gateway_sessions_ended_total", reason="deadline_exceeded") == 1
    )


async def test_backlog_bounds_input_faster_than_real_time() -> None:
    """A client dumping audio far faster than the (slowed) backends: excess frames are
    dropped and reported, never queued without bound; every frame still gets an output."""
    settings = GatewaySettings(refresh_interval_s=0.1, max_backlog_frames=2)
    stack = await start_stack(lm_delay_ms=30.0, settings=settings)
    try:
        x = audio.speech_like(2.0, 24000, seed=2)
        requests = [config_msg(24000, FLOAT32, budget_ms=2000, max_consecutive_misses=0)]
        requests += audio_msgs(x, FLOAT32, [24000])  # 1 s per chunk, no pacing
        reply = await converse(stack.stub, requests)
    finally:
        await stack.close()
    assert reply.code == grpc.StatusCode.OK, reply.details
    summary = reply.event("ended")[-1].summary
    assert summary.frames_in == summary.frames_out == 25
    dropped_events = reply.event("frames_dropped")
    assert summary.frames_dropped > 0
    assert sum(e.count for e in dropped_events) == summary.frames_dropped
    assert all(e.reason == "backlog_full" for e in dropped_events)
    dropped = {e.first_frame_index + i for e in dropped_events for i in range(e.count)}
    assert all(reply.audio[i].silence for i in dropped)
    assert [a.frame_index for a in reply.audio] == list(range(25))


async def test_admission_refuses_when_no_slot_is_free() -> None:
    stack = await start_stack(lm_slots=1, metrics=True)
    try:
        first = stack.stub.Converse()
        await first.write(config_msg(16000, PCM16))
        started = await first.read()
        assert started.event.WhichOneof("kind") == "started"
        x = audio.speech_like(0.2, 16000)
        # (paced: a grpc.aio client whose request iterator races the server's early status
        # can see INTERNAL "Internal error from Core" instead of the status)
        reply = await converse(
            stack.stub, [config_msg(16000, PCM16)] + audio_msgs(x, PCM16, [800]), pace_s=0.02
        )
        assert reply.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "free slot" in reply.details and "retry after" in reply.details
        assert int(reply.trailing["retry-after-ms"]) > 0
        first.cancel()
        metrics = scrape(stack.gateway.server.metrics_url)
        assert metric_value(metrics, "moshi_gateway_sessions_refused_total", reason="capacity") == 1
    finally:
        await stack.close()


async def test_admission_refuses_when_recent_step_times_exceed_the_budget() -> None:
    stack = await start_stack(lm_delay_ms=120.0)
    try:
        x = audio.speech_like(0.5, 24000)
        warm = [config_msg(24000, FLOAT32, budget_ms=5000)] + audio_msgs(x, FLOAT32, [1920])
        assert (await converse(stack.stub, warm, pace_s=0.02)).code == grpc.StatusCode.OK
        # One Info poll now (not a wait for the background one): the warm session's steps
        # each slept 120 ms, so the replica's recent p99 is at least that.
        await stack.gateway.pool.refresh()
        assert all(r.step_p99_ms >= 100 for r in stack.gateway.pool.sets["lm"].replicas.values())
        reply = await converse(stack.stub, [config_msg(24000, FLOAT32, budget_ms=80)])
        assert reply.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "cannot meet the 80 ms budget" in reply.details
        assert "retry-after-ms" in reply.trailing
        # A session with a budget the replica can meet is still admitted.
        ok = await converse(stack.stub, [config_msg(24000, FLOAT32, budget_ms=5000)])
        assert ok.code == grpc.StatusCode.OK
    finally:
        await stack.close()


@pytest.mark.parametrize(
    ("requests", "code", "match"),
    [
        ([config_msg(7999, PCM16)], grpc.StatusCode.INVALID_ARGUMENT, "sample_rate"),
        ([config_msg(16000, 0)], grpc.StatusCode.INVALID_ARGUMENT, "encoding"),
        (
            [config_msg(16000, PCM16, sampling=common_pb2.SamplingParams(text_temperature=-1))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "text_temperature",
        ),
        ([config_msg(16000, PCM16, budget_ms=0)], grpc.StatusCode.INVALID_ARGUMENT, "budget"),
        (
            [gateway_pb2.ConverseRequest(audio=gateway_pb2.AudioChunk(data=b"\0\0"))],
            grpc.StatusCode.FAILED_PRECONDITION,
            "SessionConfig",
        ),
        (
            [
                config_msg(16000, PCM16),
                gateway_pb2.ConverseRequest(audio=gateway_pb2.AudioChunk(data=b"\0\0\0")),
            ],
            grpc.StatusCode.INVALID_ARGUMENT,
            "whole number",
        ),
        (
            [
                config_msg(16000, FLOAT32),
                gateway_pb2.ConverseRequest(
                    audio=gateway_pb2.AudioChunk(data=np.array([np.nan], "<f4").tobytes())
                ),
            ],
            grpc.StatusCode.INVALID_ARGUMENT,
            "NaN",
        ),
        (
            [config_msg(16000, PCM16), config_msg(16000, PCM16)],
            grpc.StatusCode.FAILED_PRECONDITION,
            "only once",
        ),
    ],
    ids=["rate", "encoding", "sampling", "budget", "audio-first", "odd", "nan", "config-twice"],
)
async def test_bad_input_gets_a_clear_status(requests, code, match) -> None:
    stack = await start_stack()
    try:
        reply = await converse(stack.stub, requests)
        # Backend slots are returned whatever happened.
        for _ in range(50):
            if stack.gateway.servicer.sessions == {}:
                break
            await asyncio.sleep(0.02)
    finally:
        await stack.close()
    assert reply.code == code
    assert match in reply.details
    if reply.events:  # errors after admission still end with the summary
        assert reply.events[-1].WhichOneof("kind") == "ended"


async def test_backend_failure_mid_session_ends_with_unavailable() -> None:
    stack = await start_stack()
    try:
        call = stack.stub.Converse()
        await call.write(config_msg(24000, FLOAT32))
        started = (await call.read()).event.started
        x = audio.speech_like(0.4, 24000)
        for r in audio_msgs(x, FLOAT32, [1920]):
            await call.write(r)
        await stack.lm.stop(0)  # the LM replica dies mid-session
        messages = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    break
                messages.append(msg)
            await call.code()
            raise AssertionError("expected an error status")
    finally:
        await stack.close()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"lm replica {started.lm_replica}" in err.value.details()
    ended = [
        m.event.ended
        for m in messages
        if m.WhichOneof("kind") == "event" and m.event.HasField("ended")
    ]
    assert ended and ended[-1].summary.reason == "backend_failed"


_VANISHING_CLIENT = r"""
import sys, time, grpc, numpy as np
from moshi_grpc.v1 import gateway_pb2 as g, gateway_pb2_grpc as gg
ch = grpc.insecure_channel(sys.argv[1])
def reqs():
    yield g.ConverseRequest(config=g.SessionConfig(sample_rate=24000, encoding=g.AUDIO_ENCODING_FLOAT32))
    while True:
        yield g.ConverseRequest(audio=g.AudioChunk(data=np.zeros(1920, "<f4").tobytes()))
        time.sleep(0.08)
for msg in gg.GatewayStub(ch).Converse(reqs()):
    if msg.HasField("event") and msg.event.HasField("started"):
        print("started", flush=True)
"""


async def _slots(stack: Stack) -> tuple[int, int]:
    from moshi_grpc.v1 import codec_pb2_grpc, lm_pb2_grpc

    async with (
        grpc.aio.insecure_channel(stack.codec.address) as c,
        grpc.aio.insecure_channel(stack.lm.address) as lm_channel,
    ):
        codec_info = await codec_pb2_grpc.CodecStub(c).Info(common_pb2.InfoRequest())
        lm_info = await lm_pb2_grpc.LMStub(lm_channel).Info(common_pb2.InfoRequest())
    return codec_info.slots_in_use, lm_info.slots_in_use


async def test_vanished_client_frees_backend_slots_quickly(repo_root) -> None:
    stack = await start_stack(metrics=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _VANISHING_CLIENT,
        stack.gateway.address,
        stdout=asyncio.subprocess.PIPE,
        cwd=repo_root,
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        assert line.strip() == b"started"
        await asyncio.sleep(0.3)  # some frames flow
        assert await _slots(stack) == (1, 1)  # codec: one Encode + one Decode slot; LM: Step
        proc.kill()  # no goodbye: the socket just closes
        t0 = time.monotonic()
        freed = None
        # Poll (generously bounded: this is a hang detector, not a timing assertion; the
        # measured time is printed, and the done-callback path frees slots in milliseconds).
        while time.monotonic() - t0 < 15.0:
            if await _slots(stack) == (0, 0):
                freed = time.monotonic() - t0
                break
            await asyncio.sleep(0.01)
        assert freed is not None, "backend slots were not freed after the client vanished"
        print(f"backend slots freed {freed * 1000:.0f} ms after the client was killed")

        # The handler's own bookkeeping may finish a moment after the slots are free. Most
        # often grpc.aio cancels the handler ("cancelled"); sometimes it first reads the dead
        # stream as ended, exactly like a half-close, and the session finishes its last
        # frames ("client_closed"): context.cancelled() and code() say nothing either way
        # (checked), so the gateway cannot tell. Either way it is counted once, and ended.
        def ended(m) -> float:
            return sum(
                metric_value(m, "moshi_gateway_sessions_ended_total", reason=r)
                for r in ("cancelled", "client_closed")
            )

        for _ in range(300):
            metrics = scrape(stack.gateway.server.metrics_url)
            if ended(metrics):
                break
            await asyncio.sleep(0.05)
        assert ended(metrics) == 1
        assert metric_value(metrics, "moshi_gateway_sessions_ended_total") == 1  # all reasons
        assert metric_value(metrics, "moshi_gateway_sessions_active") == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await stack.close()


async def test_metrics_are_valid_prometheus_exposition() -> None:
    stack = await start_stack(metrics=True)
    try:
        x = audio.speech_like(0.8, 16000)
        reply = await converse(
            stack.stub, [config_msg(16000, PCM16)] + audio_msgs(x, PCM16, [640]), pace_s=0.01
        )
        assert reply.code == grpc.StatusCode.OK
        await stack.gateway.pool.refresh()  # sets the health gauges (not a wait for one)
        m = scrape(stack.gateway.server.metrics_url)
    finally:
        await stack.close()
    frames = reply.event("ended")[-1].summary.frames_out
    assert frames == 10
    assert metric_value(m, "moshi_gateway_sessions_started_total") == 1
    assert metric_value(m, "moshi_gateway_sessions_ended_total", reason="client_closed") == 1
    assert metric_value(m, "moshi_gateway_sessions_active") == 0
    assert metric_value(m, "moshi_gateway_frames_total") == frames
    assert metric_value(m, "moshi_gateway_frame_latency_seconds_count") == frames
    assert metric_value(m, "moshi_gateway_stage_seconds_count", stage="encode") == frames
    assert metric_value(m, "moshi_gateway_stage_seconds_count", stage="step") == frames
    # frame 0 is the LM's initial delay: nothing to decode
    assert metric_value(m, "moshi_gateway_stage_seconds_count", stage="decode") == frames - 1
    assert metric_value(m, "moshi_gateway_backends_healthy", service="codec") == 1
    assert metric_value(m, "moshi_gateway_backends_healthy", service="lm") == 1
    assert metric_value(m, "moshi_gateway_time_to_first_audio_seconds_count") == 1
    assert metric_value(m, "grpc_server_handled_total", grpc_method="Converse", grpc_code="OK") == 1


async def test_silent_client_is_ended_by_the_idle_timeout() -> None:
    """A client that keeps the stream open but sends nothing does not hold slots forever."""
    stack = await start_stack(settings=GatewaySettings(refresh_interval_s=0.1, idle_timeout_s=0.3))
    try:
        call = stack.stub.Converse()
        await call.write(config_msg(24000, FLOAT32))
        await call.write(audio_msgs(np.zeros(1920, np.float32), FLOAT32, [1920])[0])
        messages = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while (msg := await call.read()) is not grpc.aio.EOF:
                messages.append(msg)
    finally:
        await stack.close()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no audio from the client" in err.value.details()
    summary = messages[-1].event.ended.summary
    assert summary.reason == "idle_timeout" and summary.frames_in == summary.frames_out == 1
