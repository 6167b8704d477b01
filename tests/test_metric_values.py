"""Metric values, not just names (the README's Metrics section): what a tick cost
(`bucket_rows`) against what it served (`batch_size`), a session's wall time over the audio
it got back (`session_wall_audio_ratio`), and the predicted frame latency it was admitted
on (`admission_estimate_seconds`). The frames_dropped_total reasons are checked against the
session summaries in test_gateway_misses.py.

Which frames share a tick is decided with the scheduler's `hold()`, not by arrival times."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from svc_harness import float32_session, until_queued

from moshi_grpc.services.codec.engine import CodecOptions
from moshi_grpc.services.codec.startup import start_codec_server
from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.services.gateway.cli import start_gateway
from moshi_grpc.services.gateway.config import GatewaySettings
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

FRAME = 1920


def _cfg() -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=0)


def _sums(registry, prefix: str, labels: dict[str, str]) -> tuple[float, float, float]:
    """(ticks, rows stepped, streams served) so far: bucket_rows count and sum, batch_size
    sum."""

    def get(name: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    return (
        get(f"{prefix}_bucket_rows_count"),
        get(f"{prefix}_bucket_rows_sum"),
        get(f"{prefix}_batch_size_sum"),
    )


def _delta(after, before) -> tuple[float, ...]:
    return tuple(a - b for a, b in zip(after, before))


async def _one_held_tick(scheduler, writes, reads, registry, prefix, labels) -> tuple:
    """Queue one frame per stream while the scheduler is held, let one tick take them all,
    read the results; the tick's (count, rows, served) from the metrics."""
    before = _sums(registry, prefix, labels)
    scheduler.hold()
    try:
        for write in writes:
            await write()
        await until_queued(scheduler, len(writes))
    finally:
        scheduler.release_hold()
    for read in reads:
        await read()
    return _delta(_sums(registry, prefix, labels), before)


async def test_lm_bucket_rows_is_what_a_tick_cost_batch_size_what_it_served() -> None:
    """Three sessions on an 8-slot LM: one tick steps the bucket of 4 rows and serves 3;
    once two have left, a tick of the last one steps a single row."""
    options = LmOptions(model="echo", max_sessions=8, max_wait_ms=0.0, idle_probe_s=0)
    running = await start_lm_server(_cfg(), options)
    scheduler = running.servicer.engine.scheduler
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = lm_pb2_grpc.LMStub(channel)
            calls = [stub.Step() for _ in range(3)]
            for i, call in enumerate(calls):
                await call.write(lm_pb2.StepRequest(open=lm_pb2.LmOpen(session_id=f"s{i}")))

            def frame(call, index: int):
                codes = lm_pb2.UserCodes(index=index, codes=[1] * 8)
                return lambda: call.write(lm_pb2.StepRequest(frame=codes))

            async def read(call) -> None:
                assert (await call.read()).index in (0, 1)

            three = await _one_held_tick(
                scheduler,
                [frame(c, 0) for c in calls],
                [lambda c=c: read(c) for c in calls],
                running.registry,
                "moshi_lm",
                {},
            )
            for call in calls[1:]:
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK
            one = await _one_held_tick(
                scheduler, [frame(calls[0], 1)], [lambda: read(calls[0])], running.registry,
                "moshi_lm", {},
            )  # fmt: skip
            await calls[0].done_writing()
            assert await calls[0].code() == grpc.StatusCode.OK
    finally:
        await running.stop(0)
    assert three == (1, 4, 3)  # one tick, bucket 4, three sessions served
    assert one == (1, 1, 1)  # the rows stay packed: one session left costs one row


async def test_codec_bucket_rows_per_stage() -> None:
    """Five encode streams on an 8-slot codec: one tick of bucket 8 serving 5."""
    options = CodecOptions(model="echo", max_sessions=8, max_wait_ms=0.0, idle_probe_s=0)
    running = await start_codec_server(_cfg(), options)
    encoder = running.servicer.engine.encoder
    pcm = np.zeros(FRAME, "<f4").tobytes()
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = codec_pb2_grpc.CodecStub(channel)
            calls = [stub.Encode() for _ in range(5)]
            for i, call in enumerate(calls):
                await call.write(
                    codec_pb2.EncodeRequest(open=codec_pb2.CodecOpen(session_id=f"e{i}"))
                )
            five = await _one_held_tick(
                encoder,
                [
                    lambda c=c: c.write(
                        codec_pb2.EncodeRequest(frame=codec_pb2.PcmFrame(index=0, pcm_f32le=pcm))
                    )
                    for c in calls
                ],
                [lambda c=c: c.read() for c in calls],
                running.registry,
                "moshi_codec",
                {"stage": "encode"},
            )
            for call in calls:
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK
            decode = _sums(running.registry, "moshi_codec", {"stage": "decode"})
    finally:
        await running.stop(0)
    assert five == (1, 8, 5)
    assert decode == (0, 0, 0)  # the other stage's series saw none of it


async def test_session_wall_audio_ratio_and_admission_estimate() -> None:
    """One pre-recorded session (4 s sent at once, flow control): the ratio observed is the
    session's wall time over the 4 s of audio it got back (its summary's duration, plus the
    moment between the summary and the session's end); the estimate observed is the one the
    pool admitted it on."""
    codec = await start_codec_server(_cfg(), CodecOptions(model="echo", max_sessions=4))
    lm = await start_lm_server(_cfg(), LmOptions(model="echo", max_sessions=4))
    gateway = await start_gateway(
        _cfg(), codec.address, lm.address, GatewaySettings(refresh_interval_s=0.5)
    )
    leases = []  # the lease admission gave the session: its estimate is the one observed
    admit = gateway.admission.lease

    def recording(*args, **kwargs):
        leases.append(admit(*args, **kwargs))
        return leases[-1]

    gateway.admission.lease = recording
    frames = 50
    x = np.random.default_rng(1).uniform(-0.5, 0.5, frames * FRAME).astype("<f4")
    requests = float32_session(
        x, budget_ms=10_000, input_pacing=gateway_pb2.INPUT_PACING_FLOW_CONTROL
    )
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            opened = time.monotonic()  # the session lives inside the call
            call = gateway_pb2_grpc.GatewayStub(channel).Converse(iter(requests), timeout=60)
            replies = [r async for r in call]
            assert await call.code() == grpc.StatusCode.OK
            call_s = time.monotonic() - opened
        registry = gateway.registry
        (lease,) = leases
        estimate = lease.estimate
        for _ in range(200):  # the handler records the ratio as it ends (a hang guard)
            if registry.get_sample_value("moshi_gateway_session_wall_audio_ratio_count"):
                break
            await asyncio.sleep(0.01)
    finally:
        await gateway.stop(0)
        await codec.stop(0)
        await lm.stop(0)
    (summary,) = [r.event.ended.summary for r in replies if r.event.HasField("ended")]
    assert summary.frames_out == frames
    audio_s = frames * 0.08
    ratio = registry.get_sample_value("moshi_gateway_session_wall_audio_ratio_sum")
    assert registry.get_sample_value("moshi_gateway_session_wall_audio_ratio_count") == 1
    # the handler records the session's wall time from its start to its end: at least the
    # summary's (taken just before the end), at most the whole call's
    at_least, at_most = summary.duration_s / audio_s, call_s / audio_s
    assert at_least <= ratio <= at_most
    assert registry.get_sample_value("moshi_gateway_admission_estimate_seconds_count") == 1
    observed = registry.get_sample_value("moshi_gateway_admission_estimate_seconds_sum")
    assert estimate is not None and estimate.total_ms > 0
    assert observed == pytest.approx(estimate.total_ms / 1000.0, rel=1e-12)
