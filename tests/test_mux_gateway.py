"""The gateway's backend stream modes on real loopback servers: sessions share one mux
stream per (replica, stage), and a replica failure is every session's failure there, in
both modes (UNAVAILABLE for the codec, failover by replay for the LM)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from svc_harness import metric_value, scrape

from moshi_grpc.services.codec.engine import CodecOptions
from moshi_grpc.services.codec.startup import start_codec_server
from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.services.gateway.cli import start_gateway
from moshi_grpc.services.gateway.config import GatewaySettings
from moshi_grpc.services.gateway.streams import FRAME_S, coalesce_wait
from moshi_grpc.services.lm.engine import LmOptions
from moshi_grpc.services.lm.startup import start_lm_server
from moshi_grpc.v1 import gateway_pb2, gateway_pb2_grpc

MODES = ["mux", "per-session"]
FLOAT32 = gateway_pb2.AUDIO_ENCODING_FLOAT32


def _cfg() -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=0)


async def _codec():
    return await start_codec_server(
        _cfg(), CodecOptions(model="echo", max_sessions=16, max_wait_ms=0.0)
    )


async def _lm():
    return await start_lm_server(
        _cfg(), LmOptions(model="echo", config="small", max_sessions=16, max_wait_ms=0.0)
    )


async def _gateway(codec, lms, mode: str, **settings_kw):
    settings = GatewaySettings(refresh_interval_s=0.1, backend_streams=mode, **settings_kw)
    return await start_gateway(
        ServerConfig(host="127.0.0.1", port=0), codec.address, [x.address for x in lms], settings
    )


@dataclass
class Result:
    started: gateway_pb2.SessionStarted | None = None
    audio: list = field(default_factory=list)
    events: list = field(default_factory=list)
    code: grpc.StatusCode | None = None
    details: str = ""

    def event(self, kind: str) -> list:
        return [getattr(e, kind) for e in self.events if e.WhichOneof("kind") == kind]


def _levels(seed: int, frames: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.9, 0.9, size=(frames, 8)).astype(np.float32)


async def _session(
    stub,
    levels: np.ndarray,
    *,
    first: int,
    gate: asyncio.Event | None = None,
    res: Result | None = None,
) -> Result:
    """Send `first` frames, wait for `gate` (if any), send the rest; collect everything
    (into `res` when given, so a test can watch the session's progress)."""
    res = res if res is not None else Result()
    call = stub.Converse()
    await call.write(
        gateway_pb2.ConverseRequest(
            config=gateway_pb2.SessionConfig(sample_rate=24000, encoding=FLOAT32, budget_ms=5000)
        )
    )

    async def reader() -> None:
        async for msg in call:
            kind = msg.WhichOneof("kind")
            if kind == "audio":
                res.audio.append(msg.audio)
            elif kind == "event":
                if msg.event.HasField("started"):
                    res.started = msg.event.started
                res.events.append(msg.event)

    task = asyncio.ensure_future(reader())
    try:
        for t, row in enumerate(levels):
            if t == first and gate is not None:
                await gate.wait()
            frame = np.repeat(row, 240).astype("<f4").tobytes()
            await call.write(gateway_pb2.ConverseRequest(audio=gateway_pb2.AudioChunk(data=frame)))
            await asyncio.sleep(0.01)
        await call.done_writing()
    except grpc.aio.AioRpcError:
        pass  # the status is read below
    except asyncio.InvalidStateError:
        pass
    try:
        await asyncio.wait_for(task, 30)
        res.code = await call.code()
    except grpc.aio.AioRpcError as exc:
        res.code, res.details = exc.code(), exc.details() or ""
    return res


def _expected(levels: np.ndarray, t: int) -> np.ndarray:
    return np.repeat(np.floor((levels[t - 1] + 1.0) * 1024) / 1024 - 1.0, 240)


async def _wait_for_audio(results: list[Result], frames: int) -> None:
    for _ in range(2000):  # hang detector
        if all(len(r.audio) >= frames for r in results):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("sessions did not get their first frames")


@pytest.mark.parametrize(
    ("mode", "coalesce_ms"),
    [("mux", 0.0), ("mux", 20.0), ("per-session", 0.0)],
    ids=["mux", "mux-coalesced", "per-session"],
)
async def test_sessions_share_one_stream_per_replica_and_stage(
    mode: str, coalesce_ms: float
) -> None:
    # mux-coalesced: 5 sessions * 20 ms >= one frame, so every sender waits its window
    # (entries of several sessions per message); results must route exactly the same.
    codec, lm = await _codec(), await _lm()
    gateway = await _gateway(codec, [lm], mode, mux_coalesce_ms=coalesce_ms)
    n, frames = 5, 6
    levels = [_levels(s, frames) for s in range(n)]
    try:
        async with grpc.aio.insecure_channel(gateway.address) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            results = await asyncio.gather(*(_session(stub, lv, first=frames) for lv in levels))
            replica = next(iter(gateway.pool.sets["codec"].replicas.values()))
            mux_streams = sorted(replica.mux)
        codec_m = scrape(codec.metrics_url)
        lm_m = scrape(lm.metrics_url)
    finally:
        await gateway.stop(0)
        await codec.stop(0)
        await lm.stop(0)
    for res, lv in zip(results, levels, strict=True):
        assert res.code == grpc.StatusCode.OK, res.details
        assert [a.frame_index for a in res.audio] == list(range(frames))
        for t in range(1, frames):  # frame t <-> t, per session, whatever shares the stream
            np.testing.assert_allclose(
                np.frombuffer(res.audio[t].data, "<f4"), _expected(lv, t), atol=1e-6
            )

    def started(m, method: str) -> float:
        return metric_value(m, "grpc_server_started_total", grpc_method=method)

    if mode == "mux":
        assert mux_streams == ["decode", "encode"]
        assert started(codec_m, "EncodeMux") == started(codec_m, "DecodeMux") == 1
        assert started(lm_m, "StepMux") == 1
        assert started(codec_m, "Encode") == started(lm_m, "Step") == 0
    else:
        assert mux_streams == []
        assert started(codec_m, "Encode") == started(codec_m, "Decode") == n
        assert started(lm_m, "Step") == n
        assert started(codec_m, "EncodeMux") == started(lm_m, "StepMux") == 0
    # Per-session accounting on the backend is the same either way.
    assert metric_value(codec_m, "moshi_codec_streams_started_total", stage="encode") == n
    assert metric_value(lm_m, "moshi_lm_streams_started_total") == n
    assert metric_value(lm_m, "moshi_lm_frames_total") == n * frames


@pytest.mark.parametrize("mode", MODES)
async def test_codec_replica_killed_ends_every_session_on_it(mode: str) -> None:
    codec, lm = await _codec(), await _lm()
    gateway = await _gateway(codec, [lm], mode)
    gate = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(gateway.address) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            results = [Result() for _ in range(3)]
            tasks = [
                asyncio.ensure_future(
                    _session(stub, _levels(s, 8), first=3, gate=gate, res=results[s])
                )
                for s in range(3)
            ]
            await _wait_for_audio(results, 1)  # every session is running on the codec
            await codec.stop(0)  # the codec replica dies mid-session
            gate.set()
            results = await asyncio.gather(*tasks)
            for _ in range(2000):  # hang detector: the handlers' cleanup may trail the status
                if not gateway.servicer.sessions:
                    break
                await asyncio.sleep(0.01)
            assert gateway.servicer.sessions == {}
    finally:
        await gateway.stop(0)
        await lm.stop(0)
    for res in results:
        assert res.code == grpc.StatusCode.UNAVAILABLE, (res.code, res.details)
        assert f"codec replica {codec.address}" in res.details
        assert res.event("ended")[-1].summary.reason == "backend_failed"


@pytest.mark.parametrize("mode", MODES)
async def test_lm_replica_killed_every_session_on_it_fails_over(mode: str) -> None:
    codec, lm_a, lm_b = await _codec(), await _lm(), await _lm()
    gateway = await _gateway(codec, [lm_a, lm_b], mode)
    gate = asyncio.Event()
    n, frames, first = 4, 10, 3
    levels = [_levels(10 + s, frames) for s in range(n)]
    try:
        async with grpc.aio.insecure_channel(gateway.address) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            holders = [Result() for _ in range(n)]
            tasks = []
            for s in range(n):
                tasks.append(
                    asyncio.ensure_future(
                        _session(stub, levels[s], first=first, gate=gate, res=holders[s])
                    )
                )
            await _wait_for_audio(holders, 1)  # every session placed, first frames through
            placed = [s.lease.replicas["lm"].address for s in gateway.servicer.sessions.values()]
            assert len(placed) == n
            assert placed.count(lm_a.address) >= 1 and placed.count(lm_b.address) >= 1
            await lm_a.stop(0)  # every session on lm_a must move to lm_b
            gate.set()
            holders = await asyncio.gather(*tasks)
    finally:
        await gateway.stop(0)
        await codec.stop(0)
        await lm_b.stop(0)
    moved = 0
    for res, lv in zip(holders, levels, strict=True):
        assert res.code == grpc.StatusCode.OK, res.details
        assert [a.frame_index for a in res.audio] == list(range(frames))
        failovers = res.event("failover")
        if res.started.lm_replica == lm_a.address:
            moved += 1
            assert [(f.from_replica, f.to_replica) for f in failovers] == [
                (lm_a.address, lm_b.address)
            ]
        else:
            assert not failovers
        for t in range(1, frames):  # the echo LM's history was replayed: output still t-1
            if not res.audio[t].silence:
                np.testing.assert_allclose(
                    np.frombuffer(res.audio[t].data, "<f4"), _expected(lv, t), atol=1e-6
                )
    assert moved == placed.count(lm_a.address)


def test_coalesce_wait_only_on_a_stream_busy_enough_to_collect_more() -> None:
    window = 0.002
    busy = int(FRAME_S / window)  # sessions that send one entry per window between them
    assert coalesce_wait(busy, window) == window
    assert coalesce_wait(busy * 5, window) == window
    assert coalesce_wait(busy - 1, window) == 0.0  # a quieter stream never waits
    assert coalesce_wait(2, window) == 0.0
    assert coalesce_wait(10_000, 0.0) == 0.0  # off


@pytest.mark.parametrize("bad", [-1.0, 20.5])
async def test_out_of_range_coalescing_window_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="mux_coalesce_ms must be within 0..20"):
        await start_gateway(
            ServerConfig(host="127.0.0.1", port=0),
            "127.0.0.1:1",
            "127.0.0.1:1",
            GatewaySettings(mux_coalesce_ms=bad),
        )


async def test_unknown_backend_stream_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="backend_streams must be one of mux, per-session"):
        await start_gateway(
            ServerConfig(host="127.0.0.1", port=0),
            "127.0.0.1:1",
            "127.0.0.1:1",
            GatewaySettings(backend_streams="shared"),
        )
