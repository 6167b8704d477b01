"""LM failover and session limits of the gateway, on real loopback servers.

Two LM replicas behind one gateway: the replica a session is on is stopped (in-process
server stop: the stream fails) or frozen (SIGSTOP of a subprocess replica: the stream just
stops answering, its health probe fails) mid-session; the session must carry on on the other
replica with every input frame accounted for, a `Failover` event, and (greedy real LM) the
same output as an uninterrupted run. Plus the maximum session length and the per-client
session limit.
"""

from __future__ import annotations

import asyncio
import functools
import signal

import grpc
import numpy as np
import pytest
from svc_harness import ServiceProcess, StreamDriver
from svc_harness import channel as sync_channel

from moshi_grpc.services.codec.engine import CodecOptions
from moshi_grpc.services.codec.startup import start_codec_server
from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.services.gateway.cli import start_gateway
from moshi_grpc.services.gateway.config import GatewaySettings
from moshi_grpc.services.lm.engine import LmOptions, load_lm_model
from moshi_grpc.services.lm.startup import start_lm_server
from moshi_grpc.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, lm_pb2, lm_pb2_grpc

FLOAT32 = gateway_pb2.AUDIO_ENCODING_FLOAT32
GREEDY = common_pb2.SamplingParams(
    text_temperature=0, text_top_k=0, audio_temperature=0, audio_top_k=0
)


def _cfg() -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=None)


@functools.cache
def _small_lm():
    # the plain model (forms pinned off): tokens are compared exactly across replicas, and
    # "auto" would pick kernels by timing at load (equal only to float rounding)
    return load_lm_model(LmOptions(model="real", config="small", cpu_forms="off"))


async def _lm(model: str = "echo", slots: int = 4):
    options = LmOptions(model=model, config="small", max_sessions=slots, max_wait_ms=0.0)
    return await start_lm_server(_cfg(), options, load_model=_small_lm if model == "real" else None)


def _settings(**kw) -> GatewaySettings:
    return GatewaySettings(refresh_interval_s=0.05, probe_timeout_s=0.3, **kw)


def _frames(n: int, seed: int = 0) -> tuple[np.ndarray, list[gateway_pb2.ConverseRequest]]:
    """n frames of 24 kHz audio, each 8 segments of one level (echo output is predictable)."""
    levels = np.random.default_rng(seed).uniform(-0.9, 0.9, size=(n, 8)).astype(np.float32)
    x = np.repeat(levels, 240, axis=1)
    chunks = [
        gateway_pb2.ConverseRequest(audio=gateway_pb2.AudioChunk(data=f.astype("<f4").tobytes()))
        for f in x
    ]
    return levels, chunks


def _config(**kw) -> gateway_pb2.ConverseRequest:
    kw.setdefault("budget_ms", 5000)
    kw.setdefault("max_consecutive_misses", 0)
    return gateway_pb2.ConverseRequest(
        config=gateway_pb2.SessionConfig(sample_rate=24000, encoding=FLOAT32, **kw)
    )


async def _lockstep(stub, chunks, *, at: int, action, **config) -> tuple[list, list, object]:
    """Send frame by frame, waiting for each frame's audio before the next (so nothing is
    late for timing reasons); run `action(started)` after frame `at`'s audio is back.
    Returns (messages, audio frames, started event)."""
    call = stub.Converse(timeout=60)
    await call.write(_config(**config))
    first = await call.read()
    started = first.event.started
    messages, frames = [], []
    for i, chunk in enumerate(chunks):
        await call.write(chunk)
        while len(frames) <= i:
            msg = await call.read()
            assert msg is not grpc.aio.EOF, "stream ended early"
            messages.append(msg)
            if msg.WhichOneof("kind") == "audio":
                frames.append(msg.audio)
        if i == at:
            await action(started)
    await call.done_writing()
    while (msg := await call.read()) is not grpc.aio.EOF:
        messages.append(msg)
        if msg.WhichOneof("kind") == "audio":
            frames.append(msg.audio)
    assert await call.code() == grpc.StatusCode.OK, await call.details()
    return messages, frames, started


def _events(messages, kind: str) -> list:
    return [
        getattr(m.event, kind)
        for m in messages
        if m.WhichOneof("kind") == "event" and m.event.WhichOneof("kind") == kind
    ]


def _is_started(msg) -> bool:
    return msg.WhichOneof("kind") == "event" and msg.event.WhichOneof("kind") == "started"


def _audio_of(index: int):
    return lambda msg: msg.WhichOneof("kind") == "audio" and msg.audio.frame_index == index


def _failovers(gateway, result: str) -> float:
    value = gateway.registry.get_sample_value(
        "moshi_gateway_failovers_total", {"service": "lm", "result": result}
    )
    return value or 0.0


async def test_lm_replica_dies_mid_session_and_the_session_moves() -> None:
    """Echo LM: output frame t+1 = input frame t quantised. After the move every frame still
    has exactly that output (the new replica got the history and the unanswered frame)."""
    codec = await start_codec_server(_cfg(), CodecOptions(model="echo", max_sessions=4))
    lms = {}
    for _ in range(2):
        server = await _lm()
        lms[server.address] = server
    gateway = await start_gateway(_cfg(), codec.address, list(lms), _settings())
    channel = grpc.aio.insecure_channel(gateway.address)
    n, cut = 16, 6

    async def kill(started) -> None:
        await lms[started.lm_replica].stop(0)

    try:
        levels, chunks = _frames(n)
        stub = gateway_pb2_grpc.GatewayStub(channel)
        messages, frames, started = await _lockstep(stub, chunks, at=cut, action=kill)
    finally:
        await channel.close()
        await gateway.stop(0)
        for s in (codec, *lms.values()):
            await s.stop(0)
    (failover,) = _events(messages, "failover")
    assert failover.from_replica == started.lm_replica
    assert failover.to_replica in lms and failover.to_replica != started.lm_replica
    (ended,) = _events(messages, "ended")
    summary = ended.summary
    assert summary.reason == "client_closed"
    assert summary.frames_in == summary.frames_out == n
    assert failover.frames_lost <= summary.frames_late
    assert [f.frame_index for f in frames] == list(range(n))
    # Every frame after the initial delay is real audio, its input echoed, across the move.
    assert frames[0].silence
    for t in range(1, n):
        out = np.frombuffer(frames[t].data, "<f4").reshape(8, 240)
        if frames[t].silence:  # lost to the move: counted, and only then allowed
            assert failover.frames_lost > 0
            continue
        expected = np.floor((levels[t - 1] + 1.0) * 1024) / 1024 - 1.0
        np.testing.assert_allclose(out, np.repeat(expected[:, None], 240, axis=1), atol=1e-6)
    # The event comes before the first output produced by the new replica.
    kinds = [m.WhichOneof("kind") for m in messages]
    event_at = next(i for i, m in enumerate(messages) if m.event.HasField("failover"))
    assert kinds[event_at + 1 :].count("audio") == n - cut - 1
    assert _failovers(gateway, "ok") == 1


async def test_stalled_lm_replica_is_left_at_the_default_k() -> None:
    """The LM's model runner freezes (its server, health checks and Info still answer: no
    probe can tell). At the default budget and K the stage watch moves the session to the
    other LM after K/2 frames' time without an answer, long before K misses (in lockstep
    each miss takes a whole budget), and the session completes."""
    from test_gateway_misses import Freezer

    d = GatewaySettings()
    codec = await start_codec_server(_cfg(), CodecOptions(model="echo", max_sessions=4))
    lms = {}
    for _ in range(2):
        server = await _lm()
        lms[server.address] = server
    gateway = await start_gateway(_cfg(), codec.address, list(lms), _settings())
    channel = grpc.aio.insecure_channel(gateway.address)
    freezers = []

    async def freeze(started) -> None:
        freezer = Freezer(lms[started.lm_replica].servicer.engine.scheduler)
        freezer.armed.set()
        freezers.append(freezer)

    try:
        _, chunks = _frames(16)
        stub = gateway_pb2_grpc.GatewayStub(channel)
        messages, frames, started = await _lockstep(
            stub,
            chunks,
            at=5,
            action=freeze,
            budget_ms=d.default_budget_ms,
            max_consecutive_misses=d.default_max_consecutive_misses,
        )
    finally:
        for f in freezers:
            f.release()
        await channel.close()
        await gateway.stop(0)
        for s in (codec, *lms.values()):
            await s.stop(0)
    (failover,) = _events(messages, "failover")
    assert failover.from_replica == started.lm_replica
    (ended,) = _events(messages, "ended")
    assert ended.summary.reason == "client_closed"
    assert ended.summary.frames_in == ended.summary.frames_out == 16
    assert not frames[-1].silence  # the new replica answers
    assert _failovers(gateway, "ok") == 1


async def test_failover_with_frames_in_flight_resends_them() -> None:
    """Streaming without waiting for replies: frames are in flight at the failed replica
    when it dies; they are sent again to the new one, so none is lost (5 s budget)."""
    codec = await start_codec_server(_cfg(), CodecOptions(model="echo", max_sessions=4))
    lms = {}
    for _ in range(2):
        server = await _lm()
        lms[server.address] = server
    # A backlog that holds the whole input: nothing is dropped for pacing (the echo check
    # below needs every frame through the backends).
    settings = _settings(max_backlog_frames=64)
    gateway = await start_gateway(_cfg(), codec.address, list(lms), settings)
    channel = grpc.aio.insecure_channel(gateway.address)
    n = 40
    levels, chunks = _frames(n, seed=5)
    try:
        call = gateway_pb2_grpc.GatewayStub(channel).Converse(timeout=60)
        await call.write(_config())
        started = (await call.read()).event.started
        messages = []

        async def read_all() -> None:
            while (msg := await call.read()) is not grpc.aio.EOF:
                messages.append(msg)

        reader = asyncio.create_task(read_all())
        for i, chunk in enumerate(chunks):
            await call.write(chunk)
            if i == n // 2:
                await lms[started.lm_replica].stop(0)
            await asyncio.sleep(0.002)
        await call.done_writing()
        await reader
        code = await call.code()
    finally:
        await channel.close()
        await gateway.stop(0)
        for s in (codec, *lms.values()):
            await s.stop(0)
    assert code == grpc.StatusCode.OK
    (failover,) = _events(messages, "failover")
    assert failover.from_replica == started.lm_replica
    (ended,) = _events(messages, "ended")
    assert ended.summary.frames_in == ended.summary.frames_out == n
    assert ended.summary.frames_dropped == 0
    frames = [m.audio for m in messages if m.WhichOneof("kind") == "audio"]
    assert [f.frame_index for f in frames] == list(range(n))
    silent = [t for t in range(1, n) if frames[t].silence]
    assert len(silent) == failover.frames_lost <= ended.summary.frames_late
    for t in range(1, n):
        if t not in silent:
            out = np.frombuffer(frames[t].data, "<f4").reshape(8, 240)
            expected = np.floor((levels[t - 1] + 1.0) * 1024) / 1024 - 1.0
            np.testing.assert_allclose(out, np.repeat(expected[:, None], 240, axis=1), atol=1e-6)


async def test_greedy_real_lm_after_failover_equals_an_uninterrupted_run() -> None:
    """The small real LM, greedy: the replayed (teacher-forced) history puts the new replica
    in the same state, so text and audio after the move equal an uninterrupted run's."""
    codec = await start_codec_server(_cfg(), CodecOptions(model="echo", max_sessions=4))
    lms = {}
    for _ in range(2):
        server = await _lm("real")
        lms[server.address] = server
    gateway = await start_gateway(_cfg(), codec.address, list(lms), _settings())
    channel = grpc.aio.insecure_channel(gateway.address)
    n, cut = 14, 7

    async def nothing(started) -> None:
        pass

    async def kill(started) -> None:
        await lms[started.lm_replica].stop(0)

    try:
        _, chunks = _frames(n, seed=3)
        stub = gateway_pb2_grpc.GatewayStub(channel)
        config = {"sampling": GREEDY, "seed": 1}
        base_msgs, base, _ = await _lockstep(stub, chunks, at=cut, action=nothing, **config)
        msgs, moved, started = await _lockstep(stub, chunks, at=cut, action=kill, **config)
    finally:
        await channel.close()
        await gateway.stop(0)
        for s in (codec, *lms.values()):
            await s.stop(0)
    (failover,) = _events(msgs, "failover")
    assert failover.from_replica == started.lm_replica
    assert failover.frames_lost == 0  # lockstep with a 5 s budget: nothing is late
    (ended,) = _events(msgs, "ended")
    assert ended.summary.frames_in == ended.summary.frames_out == n
    assert [(f.silence, f.data) for f in moved] == [(f.silence, f.data) for f in base]
    assert any(not f.silence for f in moved[cut + 1 :]), "the LM should speak after the move"

    def text(ms):
        return [(m.text.frame_index, m.text.text) for m in ms if m.WhichOneof("kind") == "text"]

    assert text(msgs) == text(base_msgs)


async def test_no_other_lm_replica_ends_with_unavailable() -> None:
    """The other LM replica has no free slot: the session ends with UNAVAILABLE as before,
    and the failed failover is counted."""
    codec = await start_codec_server(_cfg(), CodecOptions(model="echo", max_sessions=4))
    a, b = await _lm(slots=2), await _lm(slots=1)
    lm_channel = grpc.aio.insecure_channel(b.address)
    hog = lm_pb2_grpc.LMStub(lm_channel).Step()  # takes b's only slot
    await hog.write(lm_pb2.StepRequest(open=lm_pb2.LmOpen(session_id="hog")))
    gateway = await start_gateway(_cfg(), codec.address, [a.address, b.address], _settings())
    try:
        for _ in range(100):  # until the gateway has seen b full
            await asyncio.sleep(0.05)
            if not gateway.pool.sets["lm"].replicas[b.address].available:
                break
        assert not gateway.pool.sets["lm"].replicas[b.address].available, (
            "b's only slot not seen taken"
        )
        _, chunks = _frames(12)
        # The sync client (svc_harness.run_stream says why): grpc.aio may report INTERNAL
        # for a stream the server ends while the client writes, which would hide the status.
        with sync_channel(gateway.address) as ch:
            d = StreamDriver(gateway_pb2_grpc.GatewayStub(ch).Converse, _config(), timeout=60)
            started = await asyncio.to_thread(d.wait_for, _is_started, 20)
            assert started, "no SessionStarted"
            for i, chunk in enumerate(chunks):
                d.send(chunk)
                if i == 2:  # frames 0-2 answered by a, then a dies
                    assert await asyncio.to_thread(d.wait_for, _audio_of(i), 20)
                    start = next(r.event.started for r in d.replies if _is_started(r))
                    assert start.lm_replica == a.address
                    await a.stop(0)
            d.close()
            code = await asyncio.to_thread(d.wait, 30)
        failed = _failovers(gateway, "failed")
    finally:
        hog.cancel()
        await lm_channel.close()
        await gateway.stop(0)
        for s in (codec, a, b):
            await s.stop(0)
    assert code == grpc.StatusCode.UNAVAILABLE, (code, d.details)
    assert a.address in d.details, d.details
    (ended,) = _events(d.replies, "ended")
    assert ended.summary.reason == "backend_failed"
    assert failed == 1


async def test_no_lm_failover_ends_the_session_when_its_lm_dies() -> None:
    """`--no-lm-failover` (lm_failover=False): a free LM replica is there, but a session
    whose LM dies ends with UNAVAILABLE and its summary instead of moving; nothing is
    counted as a failover."""
    codec = await start_codec_server(_cfg(), CodecOptions(model="echo", max_sessions=4))
    lms = {}
    for _ in range(2):
        server = await _lm()
        lms[server.address] = server
    gateway = await start_gateway(_cfg(), codec.address, list(lms), _settings(lm_failover=False))
    _, chunks = _frames(12)
    try:
        with sync_channel(gateway.address) as ch:
            d = StreamDriver(gateway_pb2_grpc.GatewayStub(ch).Converse, _config(), timeout=60)
            for i, chunk in enumerate(chunks):
                d.send(chunk)
                if i == 2:  # frames 0-2 answered, then the session's LM dies
                    assert await asyncio.to_thread(d.wait_for, _audio_of(i), 20)
                    start = next(r.event.started for r in d.replies if _is_started(r))
                    await lms[start.lm_replica].stop(0)
            d.close()
            code = await asyncio.to_thread(d.wait, 30)
        counted = _failovers(gateway, "ok") + _failovers(gateway, "failed")
    finally:
        await gateway.stop(0)
        for s in (codec, *lms.values()):
            await s.stop(0)
    assert code == grpc.StatusCode.UNAVAILABLE, (code, d.details)
    assert start.lm_replica in d.details
    assert not _events(d.replies, "failover")
    (ended,) = _events(d.replies, "ended")
    assert ended.summary.reason == "backend_failed"
    assert ended.summary.frames_out == len(
        [r for r in d.replies if r.WhichOneof("kind") == "audio"]
    )
    assert counted == 0


@pytest.mark.slow
async def test_frozen_lm_replica_is_left_when_its_health_probe_fails(
    tmp_path, free_port_factory
) -> None:
    """SIGSTOP: the stream does not fail, it just stops answering; the gateway's health
    probe times out and the session moves to the other replica."""
    proc = ServiceProcess(
        "lm",
        free_port_factory(),
        free_port_factory(),
        ["--model", "echo", "--max-sessions", "2"],
        tmp_path / "lm.log",
    )
    codec = await start_codec_server(_cfg(), CodecOptions(model="echo", max_sessions=4))
    other = await _lm(slots=1)
    lm_channel = grpc.aio.insecure_channel(other.address)
    hog = lm_pb2_grpc.LMStub(lm_channel).Step()  # so the session lands on the subprocess
    await hog.write(lm_pb2.StepRequest(open=lm_pb2.LmOpen(session_id="hog")))
    gateway = None
    channel = None
    try:
        await asyncio.to_thread(proc.wait_serving)
        gateway = await start_gateway(
            _cfg(), codec.address, [proc.address, other.address], _settings()
        )
        channel = grpc.aio.insecure_channel(gateway.address)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not gateway.pool.sets["lm"].replicas[other.address].available:
                break
        n, cut = 10, 3

        async def freeze(started) -> None:
            assert started.lm_replica == proc.address
            hog.cancel()  # free the other replica's slot
            for _ in range(100):  # until the gateway sees the slot free
                await asyncio.sleep(0.05)
                if gateway.pool.sets["lm"].replicas[other.address].available:
                    break
            proc.signal(signal.SIGSTOP)

        levels, chunks = _frames(n)
        stub = gateway_pb2_grpc.GatewayStub(channel)
        messages, frames, started = await _lockstep(stub, chunks, at=cut, action=freeze)
    finally:
        proc.signal(signal.SIGCONT)
        if channel is not None:
            await channel.close()
        if gateway is not None:
            await gateway.stop(0)
        hog.cancel()
        await lm_channel.close()
        await codec.stop(0)
        await other.stop(0)
        await asyncio.to_thread(proc.stop)
    (failover,) = _events(messages, "failover")
    assert (failover.from_replica, failover.to_replica) == (proc.address, other.address)
    (ended,) = _events(messages, "ended")
    assert ended.summary.frames_in == ended.summary.frames_out == n
    assert [f.frame_index for f in frames] == list(range(n))
    real = [t for t in range(1, n) if not frames[t].silence]
    assert len(real) == n - 1 - failover.frames_lost
    for t in real:
        out = np.frombuffer(frames[t].data, "<f4").reshape(8, 240)
        expected = np.floor((levels[t - 1] + 1.0) * 1024) / 1024 - 1.0
        np.testing.assert_allclose(out, np.repeat(expected[:, None], 240, axis=1), atol=1e-6)


def test_history_keeps_the_last_steps_in_order() -> None:
    from moshi_grpc.services.gateway.history import LmHistory

    history = LmHistory(5, num_codebooks=3)
    expected = []
    for s in range(12):
        user = [s, s + 1]
        if s % 3 == 0:
            history.append(user, None, ())
            expected.append(lm_pb2.ReplayStep(user_codes=user))
        else:
            moshi = [s, 2 * s, 3 * s]
            history.append(user, 100 + s, moshi)
            expected.append(
                lm_pb2.ReplayStep(user_codes=user, text_token=100 + s, moshi_codes=moshi)
            )
        assert history.replay() == expected[-5:]
    assert len(history) == 5
    with pytest.raises(ValueError, match="capacity"):
        LmHistory(0)


# ----------------------------------------------------------------- session limits


async def _stack(**settings):
    codec = await start_codec_server(_cfg(), CodecOptions(model="echo", max_sessions=8))
    lm = await _lm(slots=8)
    gateway = await start_gateway(_cfg(), codec.address, lm.address, _settings(**settings))
    return codec, lm, gateway


def _paced_sync_converse(address: str, config, chunk, count: int, pace_s: float):
    """Sync client (see svc_harness.run_stream on why): paced chunks; returns (code, msgs)."""
    import time

    def requests():
        yield config
        for _ in range(count):
            yield chunk
            time.sleep(pace_s)

    messages = []
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        try:
            for msg in stub.Converse(requests(), timeout=60):
                messages.append(msg)
        except grpc.RpcError as err:
            return err.code(), err.details(), messages
    return grpc.StatusCode.OK, "", messages


async def test_max_session_length_ends_with_summary_and_deadline_exceeded() -> None:
    codec, lm, gateway = await _stack(max_session_s=0.4)
    try:
        _, chunks = _frames(1)
        # 400 frames paced at 10 ms would take 4 s: the 0.4 s limit ends it long before.
        code, details, messages = await asyncio.to_thread(
            _paced_sync_converse, gateway.address, _config(), chunks[0], 400, 0.01
        )
        ended_metric = gateway.registry.get_sample_value(
            "moshi_gateway_sessions_ended_total", {"reason": "max_session_length"}
        )
    finally:
        await gateway.stop(0)
        await codec.stop(0)
        await lm.stop(0)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
    assert "maximum session length" in details
    (ended,) = _events(messages, "ended")
    assert ended.summary.reason == "max_session_length"
    # Input stops at the limit; the frames in flight still come back: all accounted for.
    assert 0 < ended.summary.frames_out == ended.summary.frames_in < 400
    assert ended_metric == 1


async def test_sessions_per_client_are_limited() -> None:
    codec, lm, gateway = await _stack(max_sessions_per_client=1)
    channel = grpc.aio.insecure_channel(gateway.address)
    stub = gateway_pb2_grpc.GatewayStub(channel)

    async def open_session(**config):
        call = stub.Converse(timeout=30)
        await call.write(_config(**config))
        try:
            msg = await call.read()
        except grpc.aio.AioRpcError as err:
            return call, err.code(), err.details()
        assert msg.event.HasField("started")
        return call, grpc.StatusCode.OK, ""

    try:
        first, code, _ = await open_session(client_id="alice")
        assert code == grpc.StatusCode.OK
        _, code, details = await open_session(client_id="alice")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "alice" in details and "per client" in details
        other, code, _ = await open_session(client_id="bob")
        assert code == grpc.StatusCode.OK
        # Without a client_id the key is the peer's address: one anonymous session here.
        anon, code, _ = await open_session()
        assert code == grpc.StatusCode.OK
        _, code, details = await open_session()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "127.0.0.1" in details
        # Ending alice's session frees her place.
        await first.done_writing()
        while await first.read() is not grpc.aio.EOF:
            pass
        assert await first.code() == grpc.StatusCode.OK
        again, code, _ = await open_session(client_id="alice")
        assert code == grpc.StatusCode.OK
        for call in (other, anon, again):
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
        refused = gateway.registry.get_sample_value(
            "moshi_gateway_sessions_refused_total", {"reason": "per_client"}
        )
    finally:
        await channel.close()
        await gateway.stop(0)
        await codec.stop(0)
        await lm.stop(0)
    assert refused == 2


def test_gateway_flags_set_the_limits_and_failover() -> None:
    import argparse

    from moshi_grpc.services.gateway import cli

    def settings(*argv: str) -> GatewaySettings:
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        base = ["--codec-addr", "127.0.0.1:1", "--lm-addr", "127.0.0.1:2"]
        return cli.settings_from_args(parser.parse_args(base + list(argv)))

    d = settings()
    assert (d.max_session_s, d.max_sessions_per_client, d.lm_failover) == (0.0, 0, True)
    assert d.lm_history_steps == 3000
    s = settings(
        "--max-session-s=90",
        "--max-sessions-per-client=2",
        "--no-lm-failover",
        "--lm-history-steps=100",
    )
    assert (s.max_session_s, s.max_sessions_per_client, s.lm_failover) == (90.0, 2, False)
    assert s.lm_history_steps == 100
    for bad in ("--max-session-s=-1", "--max-sessions-per-client=-1", "--lm-history-steps=0"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            settings(bad)
