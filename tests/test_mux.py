"""The multiplexed backend RPCs (EncodeMux, DecodeMux, StepMux) on real loopback servers.

Many sessions share one stream; each must behave exactly like its own per-session stream
(same results frame for frame, same statuses), and a session's error must end only it.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from svc_harness import metric_value, scrape

from moshi_grpc.services.codec.engine import CodecOptions
from moshi_grpc.services.codec.startup import start_codec_server
from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.services.lm.engine import LmOptions
from moshi_grpc.services.lm.startup import start_lm_server
from moshi_grpc.v1 import codec_pb2, codec_pb2_grpc, common_pb2, lm_pb2, lm_pb2_grpc

OK = grpc.StatusCode.OK.value[0]


def _cfg() -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=0)


async def _codec(slots: int = 16, max_wait_ms: float = 0.0):
    return await start_codec_server(
        _cfg(), CodecOptions(model="echo", max_sessions=slots, max_wait_ms=max_wait_ms)
    )


async def _lm(slots: int = 16):
    return await start_lm_server(
        _cfg(), LmOptions(model="echo", config="small", max_sessions=slots, max_wait_ms=0.0)
    )


def _pcm(rng: np.random.Generator) -> bytes:
    return rng.uniform(-0.95, 0.95, 1920).astype("<f4").tobytes()


async def _collect(call, until_ended: set[int]) -> tuple[dict[int, list], dict[int, tuple]]:
    """Read results until every session in `until_ended` has its end: frames per session
    (in arrival order) and (code, message) per ended session."""
    frames: dict[int, list] = {}
    ends: dict[int, tuple] = {}
    while not until_ended <= set(ends):
        response = await asyncio.wait_for(call.read(), 20)
        assert response is not grpc.aio.EOF, (
            f"stream ended before every session did: {ends} {frames}"
        )
        for r in response.results:
            if r.HasField("frame"):
                assert r.session not in ends, "a frame after the session's end"
                frames.setdefault(r.session, []).append(r.frame)
            else:
                ends[r.session] = (r.end.code, r.end.message)
    return frames, ends


async def _slots_in_use(stub) -> int:
    return (await stub.Info(common_pb2.InfoRequest())).slots_in_use


async def _wait_slots(stub, expected: int) -> None:
    for _ in range(500):  # a hang detector, not a timing assertion
        if await _slots_in_use(stub) == expected:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"slots in use never reached {expected}")


async def test_many_sessions_on_one_stream_match_per_session_streams() -> None:
    """Encode and Decode: six sessions interleaved on one stream (several frames of one
    session in a message too) give exactly the per-session streams' results, t for t."""
    codec = await _codec()
    rng = np.random.default_rng(0)
    n, frames = 6, 5
    pcm = [[_pcm(rng) for _ in range(frames)] for _ in range(n)]
    codes = rng.integers(0, 2048, size=(n, frames, 8)).tolist()
    try:
        async with grpc.aio.insecure_channel(codec.address) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            # Per-session reference.
            ref_codes, ref_pcm = [], []
            for s in range(n):
                enc = stub.Encode()
                await enc.write(codec_pb2.EncodeRequest(open=codec_pb2.CodecOpen()))
                dec = stub.Decode()
                await dec.write(codec_pb2.DecodeRequest(open=codec_pb2.CodecOpen()))
                for t in range(frames):
                    frame = codec_pb2.PcmFrame(index=t, pcm_f32le=pcm[s][t])
                    await enc.write(codec_pb2.EncodeRequest(frame=frame))
                    await dec.write(
                        codec_pb2.DecodeRequest(
                            frame=codec_pb2.CodesFrame(index=t, codes=codes[s][t])
                        )
                    )
                await enc.done_writing()
                await dec.done_writing()
                ref_codes.append([list(m.codes) async for m in enc])
                ref_pcm.append([m.pcm_f32le async for m in dec])
            # Multiplexed: session ids need not be dense or ordered.
            sids = [7 + 3 * s for s in range(n)]
            enc = stub.EncodeMux()
            dec = stub.DecodeMux()
            e_open = codec_pb2.EncodeMuxRequest()
            d_open = codec_pb2.DecodeMuxRequest()
            for sid in sids:
                e_open.entries.add(session=sid, open=codec_pb2.CodecOpen(session_id=str(sid)))
                d_open.entries.add(session=sid, open=codec_pb2.CodecOpen())
            await enc.write(e_open)
            await dec.write(d_open)
            for t in range(0, frames, 2):  # two frames per session in most messages
                e_req = codec_pb2.EncodeMuxRequest()
                d_req = codec_pb2.DecodeMuxRequest()
                for s, sid in reversed(list(enumerate(sids))):
                    for u in range(t, min(t + 2, frames)):
                        e_req.entries.add(
                            session=sid, frame=codec_pb2.PcmFrame(index=u, pcm_f32le=pcm[s][u])
                        )
                        d_req.entries.add(
                            session=sid, frame=codec_pb2.CodesFrame(index=u, codes=codes[s][u])
                        )
                    if u == frames - 1:
                        e_req.entries.add(session=sid, close=True)
                        d_req.entries.add(session=sid, close=True)
                await enc.write(e_req)
                await dec.write(d_req)
            e_frames, e_ends = await _collect(enc, set(sids))
            d_frames, d_ends = await _collect(dec, set(sids))
            await enc.done_writing()
            await dec.done_writing()
            assert await enc.read() is grpc.aio.EOF and await enc.code() == grpc.StatusCode.OK
            assert await dec.read() is grpc.aio.EOF and await dec.code() == grpc.StatusCode.OK
            for s, sid in enumerate(sids):
                assert e_ends[sid] == (OK, "") and d_ends[sid] == (OK, "")
                assert [f.index for f in e_frames[sid]] == list(range(frames))
                assert [list(f.codes) for f in e_frames[sid]] == ref_codes[s]
                assert [f.pcm_f32le for f in d_frames[sid]] == ref_pcm[s]
                assert all(f.timing.batch_size >= 1 for f in e_frames[sid])
            await _wait_slots(stub, 0)
        m = scrape(codec.metrics_url)
    finally:
        await codec.stop(0)
    # Per-session accounting as for per-session streams: 2 x n streams per stage.
    for stage in ("encode", "decode"):
        assert metric_value(m, "moshi_codec_streams_started_total", stage=stage) == 2 * n
        assert metric_value(m, "moshi_codec_frames_total", stage=stage) == 2 * n * frames
        assert metric_value(m, "moshi_codec_streams_active", stage=stage) == 0


async def test_step_mux_matches_step_with_replay() -> None:
    """StepMux sessions (one with a replayed history) answer like Step streams."""
    lm = await _lm()
    rng = np.random.default_rng(1)
    frames = 4
    user = rng.integers(0, 2048, size=(3, frames, 8)).tolist()
    replay = [lm_pb2.ReplayStep(user_codes=rng.integers(0, 2048, 8).tolist()) for _ in range(3)]
    opens = [
        lm_pb2.LmOpen(seed=1),
        lm_pb2.LmOpen(seed=2, replay=replay),
        lm_pb2.LmOpen(seed=3),
    ]
    try:
        async with grpc.aio.insecure_channel(lm.address) as ch:
            stub = lm_pb2_grpc.LMStub(ch)
            ref = []
            for s, opened in enumerate(opens):
                call = stub.Step()
                await call.write(lm_pb2.StepRequest(open=opened))
                first = len(opened.replay)
                for t in range(frames):
                    await call.write(
                        lm_pb2.StepRequest(
                            frame=lm_pb2.UserCodes(index=first + t, codes=user[s][t])
                        )
                    )
                await call.done_writing()
                ref.append([(m.index, m.ready, list(m.moshi_codes)) async for m in call])
            call = stub.StepMux()
            request = lm_pb2.StepMuxRequest()
            for s, opened in enumerate(opens):
                request.entries.add(session=s, open=opened)
            await call.write(request)
            for t in range(frames):
                request = lm_pb2.StepMuxRequest()
                for s, opened in enumerate(opens):
                    index = len(opened.replay) + t
                    request.entries.add(
                        session=s, frame=lm_pb2.UserCodes(index=index, codes=user[s][t])
                    )
                await call.write(request)
            await call.done_writing()  # half-close: every session ends after its frames
            got, ends = await _collect(call, {0, 1, 2})
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
        m = scrape(lm.metrics_url)
    finally:
        await lm.stop(0)
    for s in range(3):
        assert ends[s] == (OK, "")
        assert [(f.index, f.ready, list(f.moshi_codes)) for f in got[s]] == ref[s]
    assert ref[1][0][1] is True  # the replay took the echo past its initial delay
    assert metric_value(m, "moshi_lm_replayed_steps_total") == 2 * len(replay)
    assert metric_value(m, "moshi_lm_streams_started_total") == 6


async def test_a_session_error_ends_only_that_session() -> None:
    codec = await _codec()
    rng = np.random.default_rng(2)
    try:
        async with grpc.aio.insecure_channel(codec.address) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            call = stub.EncodeMux()
            request = codec_pb2.EncodeMuxRequest()
            for sid in (1, 2, 3, 4):
                request.entries.add(session=sid, open=codec_pb2.CodecOpen())
            request.entries.add(session=1, frame=codec_pb2.PcmFrame(index=0, pcm_f32le=_pcm(rng)))
            # 2: a short frame; 3: a gap in the indices; 4: a second open; 9: never opened.
            request.entries.add(session=2, frame=codec_pb2.PcmFrame(index=0, pcm_f32le=b"\0" * 8))
            request.entries.add(session=3, frame=codec_pb2.PcmFrame(index=1, pcm_f32le=_pcm(rng)))
            request.entries.add(session=4, open=codec_pb2.CodecOpen())
            request.entries.add(session=9, frame=codec_pb2.PcmFrame(index=0, pcm_f32le=_pcm(rng)))
            await call.write(request)
            frames, ends = await _collect(call, {2, 3, 4, 9})
            assert ends[2][0] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert "7680 bytes" in ends[2][1]
            assert ends[3][0] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
            assert "expected 0" in ends[3][1]
            assert ends[4][0] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
            assert "second `open`" in ends[4][1]
            assert ends[9][0] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
            await _wait_slots(stub, 1)  # only session 1 still holds a slot
            # Session 1 carries on, on the same stream.
            request = codec_pb2.EncodeMuxRequest()
            request.entries.add(session=1, frame=codec_pb2.PcmFrame(index=1, pcm_f32le=_pcm(rng)))
            request.entries.add(session=1, close=True)
            await call.write(request)
            more, ends1 = await _collect(call, {1})
            assert ends1[1] == (OK, "")
            assert [f.index for f in frames.get(1, []) + more.get(1, [])] == [0, 1]
            await _wait_slots(stub, 0)
            call.cancel()
    finally:
        await codec.stop(0)


async def test_capacity_refusal_is_per_session() -> None:
    lm = await _lm(slots=2)
    try:
        async with grpc.aio.insecure_channel(lm.address) as ch:
            stub = lm_pb2_grpc.LMStub(ch)
            call = stub.StepMux()
            request = lm_pb2.StepMuxRequest()
            for sid in (1, 2, 3):
                request.entries.add(session=sid, open=lm_pb2.LmOpen())
            await call.write(request)
            _, ends = await _collect(call, {3})
            assert ends[3][0] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "slots are in use" in ends[3][1]
            assert await _slots_in_use(stub) == 2
            request = lm_pb2.StepMuxRequest()
            for sid in (1, 2):
                request.entries.add(session=sid, frame=lm_pb2.UserCodes(index=0, codes=[5] * 8))
                request.entries.add(session=sid, close=True)
            await call.write(request)
            frames, ends = await _collect(call, {1, 2})
            assert ends[1] == ends[2] == (OK, "")
            assert len(frames[1]) == len(frames[2]) == 1
            call.cancel()
        m = scrape(lm.metrics_url)
    finally:
        await lm.stop(0)
    assert metric_value(m, "moshi_lm_streams_refused_total", reason="capacity") == 1
    assert metric_value(m, "moshi_lm_streams_started_total") == 2


async def test_a_dead_stream_frees_every_session_and_cancel_frees_one() -> None:
    codec = await _codec()
    rng = np.random.default_rng(3)
    try:
        async with grpc.aio.insecure_channel(codec.address) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            call = stub.EncodeMux()
            request = codec_pb2.EncodeMuxRequest()
            for sid in (1, 2, 3):
                request.entries.add(session=sid, open=codec_pb2.CodecOpen())
                request.entries.add(
                    session=sid, frame=codec_pb2.PcmFrame(index=0, pcm_f32le=_pcm(rng))
                )
            await call.write(request)
            frames, _ = await _collect_frames(call, 3)
            assert sorted(frames) == [1, 2, 3]
            assert await _slots_in_use(stub) == 3
            request = codec_pb2.EncodeMuxRequest()
            request.entries.add(session=2, cancel=True)  # dropped at once, no answer
            await call.write(request)
            await _wait_slots(stub, 2)
            call.cancel()  # the caller vanishes: every session on the stream is freed
            await _wait_slots(stub, 0)
    finally:
        await codec.stop(0)


async def _collect_frames(call, count: int) -> tuple[dict[int, list], int]:
    frames: dict[int, list] = {}
    got = 0
    while got < count:
        response = await asyncio.wait_for(call.read(), 20)
        for r in response.results:
            assert r.HasField("frame"), r
            frames.setdefault(r.session, []).append(r.frame)
            got += 1
    return frames, got


async def test_draining_replica_refuses_new_sessions_and_ends_the_stream() -> None:
    """While draining: live sessions finish, a new open gets UNAVAILABLE, and the stream
    ends once no session is left (so the drain does not wait for its grace period)."""
    lm = await _lm()
    try:
        async with grpc.aio.insecure_channel(lm.address) as ch:
            stub = lm_pb2_grpc.LMStub(ch)
            call = stub.StepMux()
            request = lm_pb2.StepMuxRequest()
            request.entries.add(session=1, open=lm_pb2.LmOpen())
            request.entries.add(session=1, frame=lm_pb2.UserCodes(index=0, codes=[1] * 8))
            await call.write(request)
            await _collect_frames(call, 1)
            drain = asyncio.ensure_future(lm.drain(30.0))
            for _ in range(500):
                if lm.draining:
                    break
                await asyncio.sleep(0.01)
            assert lm.draining
            request = lm_pb2.StepMuxRequest()
            request.entries.add(session=2, open=lm_pb2.LmOpen())
            request.entries.add(session=1, frame=lm_pb2.UserCodes(index=1, codes=[1] * 8))
            request.entries.add(session=1, close=True)
            await call.write(request)
            frames, ends = await _collect(call, {1, 2})
            assert ends[2][0] == grpc.StatusCode.UNAVAILABLE.value[0]
            assert ends[1] == (OK, "") and [f.index for f in frames[1]] == [1]
            assert await asyncio.wait_for(call.read(), 20) is grpc.aio.EOF
            await asyncio.wait_for(drain, 20)
    finally:
        await lm.stop(0)


async def test_big_bursts_are_split_under_the_message_limit() -> None:
    """600 sessions' PCM frames at once (4.6 MB, more than the 4 MiB message limit), as
    requests (Encode) and as results (Decode): the gateway's stream class and the backend
    split them into capped messages, and every session gets its answer."""
    from types import SimpleNamespace

    from moshi_grpc.services.gateway.moshi_pipeline import DECODE, ENCODE
    from moshi_grpc.services.gateway.streams import MUX, open_stream

    n = 600
    # (a generous max wait: all 600 frames go through one batched call, so all 600 results
    # are ready at once)
    codec = await _codec(slots=n, max_wait_ms=3000.0)
    rng = np.random.default_rng(4)
    frames = [_pcm(rng) for _ in range(n)]
    try:
        async with grpc.aio.insecure_channel(codec.address) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            target = SimpleNamespace(stub=stub, address=codec.address, mux={})
            streams = [open_stream(target, ENCODE, (), MUX) for _ in range(n)]
            for stream, pcm in zip(streams, frames, strict=True):  # no await between: one burst
                await stream.open(codec_pb2.CodecOpen())
                await stream.send(codec_pb2.PcmFrame(index=0, pcm_f32le=pcm))
                await stream.done_writing()
            for stream, pcm in zip(streams, frames, strict=True):
                got = await asyncio.wait_for(stream.read(), 30)
                assert got is not grpc.aio.EOF and got.index == 0
                assert list(got.codes) == (
                    np.floor((np.frombuffer(pcm, "<f4")[::240] + 1.0) * 1024)
                    .clip(0, 2047)
                    .astype(int)
                    .tolist()
                )
                assert await asyncio.wait_for(stream.read(), 30) is grpc.aio.EOF
            # Decode: small requests, 600 PCM frames back at once (the backend's cap).
            codes = rng.integers(0, 2048, size=(n, 8)).tolist()
            decoders = [open_stream(target, DECODE, (), MUX) for _ in range(n)]
            for stream in decoders:
                await stream.open(codec_pb2.CodecOpen())
            await _wait_slots(stub, n)  # all open: the frames below make one batched call
            for stream, row in zip(decoders, codes, strict=True):
                await stream.send(codec_pb2.CodesFrame(index=0, codes=row))
                await stream.done_writing()
            for stream, row in zip(decoders, codes, strict=True):
                got = await asyncio.wait_for(stream.read(), 30)
                assert got is not grpc.aio.EOF and len(got.pcm_f32le) == 7680
                levels = np.frombuffer(got.pcm_f32le, "<f4")[::240]
                np.testing.assert_allclose(levels, np.array(row) / 1024 - 1.0, atol=1e-6)
                assert await asyncio.wait_for(stream.read(), 30) is grpc.aio.EOF
            for name in ("encode", "decode"):
                mux = target.mux[name]
                assert not mux.broken and mux.sessions == {}
                mux.close()
            await _wait_slots(stub, 0)
    finally:
        await codec.stop(0)
