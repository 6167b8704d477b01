"""The codec service on loopback: batched streams equal solo model runs, joins/leaves,
capacity, and every bad input answered with its status while other streams keep going."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch
from svc_harness import until_queued

from moshi_grpc.services.codec.engine import CodecOptions
from moshi_grpc.services.codec.startup import start_codec_server
from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.v1 import codec_pb2, codec_pb2_grpc, common_pb2

FRAME = 1920


@pytest.fixture(scope="module")
def tiny_mimi():
    from moshi_grpc.models.mimi import load_mimi

    return load_mimi(None, config="tiny")


def audio(seed: int, frames: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(frames * FRAME) / 24000.0
    x = 0.3 * np.sin(2 * np.pi * (100 + 50 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    return x.astype(np.float32).reshape(frames, FRAME)


def enc_open(sid: str) -> codec_pb2.EncodeRequest:
    return codec_pb2.EncodeRequest(open=codec_pb2.CodecOpen(session_id=sid))


def enc_frame(i: int, data: bytes) -> codec_pb2.EncodeRequest:
    return codec_pb2.EncodeRequest(frame=codec_pb2.PcmFrame(index=i, pcm_f32le=data))


def dec_open(sid: str) -> codec_pb2.DecodeRequest:
    return codec_pb2.DecodeRequest(open=codec_pb2.CodecOpen(session_id=sid))


def dec_frame(i: int, codes) -> codec_pb2.DecodeRequest:
    return codec_pb2.DecodeRequest(frame=codec_pb2.CodesFrame(index=i, codes=list(codes)))


def solo(mimi, frames: np.ndarray) -> tuple[list[list[int]], list[bytes]]:
    """Each stream alone through the model API: batch of one, fresh state."""
    enc, dec = mimi.streaming_encoder(1), mimi.streaming_decoder(1)
    codes, pcm = [], []
    for f in frames:
        c = enc.step(torch.from_numpy(f)[None])
        codes.append(c[0].tolist())
        p = dec.step(c)
        pcm.append(p[0].float().numpy().astype("<f4").tobytes())
    return codes, pcm


async def run_stream(stub, sid: str, frames: np.ndarray, start_after: asyncio.Event | None):
    """Encode then decode one stream interactively (frame by frame, like a gateway)."""
    if start_after is not None:
        await start_after.wait()
    enc, dec = stub.Encode(), stub.Decode()
    await enc.write(enc_open(sid))
    await dec.write(dec_open(sid))
    codes, pcm, batch = [], [], []
    for i, f in enumerate(frames):
        await enc.write(enc_frame(i, f.tobytes()))
        out = await enc.read()
        assert out.index == i
        codes.append(list(out.codes))
        batch.append(out.timing.batch_size)
        await dec.write(dec_frame(i, out.codes))
        back = await dec.read()
        assert back.index == i and len(back.pcm_f32le) == FRAME * 4
        pcm.append(back.pcm_f32le)
        assert out.timing.compute_ms > 0
    await enc.done_writing()
    await dec.done_writing()
    assert await enc.code() == grpc.StatusCode.OK
    assert await dec.code() == grpc.StatusCode.OK
    return codes, pcm, batch


@pytest.mark.slow
async def test_concurrent_streams_with_joins_and_leaves_equal_solo_runs(tiny_mimi) -> None:
    # 3 slots, 4 streams: "c" leaves early and "d" takes its slot mid-run (slot reset).
    plan = {"a": (0, 6), "b": (1, 4), "c": (2, 2), "d": (3, 3)}
    inputs = {sid: audio(seed, n) for sid, (seed, n) in plan.items()}
    running = await start_codec_server(
        ServerConfig(),
        CodecOptions(max_sessions=3, max_wait_ms=20),
        load_model=lambda: tiny_mimi,
    )
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            c_done = asyncio.Event()

            async def c_then_signal():
                out = await run_stream(stub, "c", inputs["c"], None)
                c_done.set()
                return out

            # The first frames of a, b and c share one encoder tick, whatever their arrival
            # times: the scheduler runs no tick until all three are queued.
            encoder = running.servicer.engine.encoder
            encoder.hold()
            streams = asyncio.gather(
                run_stream(stub, "a", inputs["a"], None),
                run_stream(stub, "b", inputs["b"], None),
                c_then_signal(),
                run_stream(stub, "d", inputs["d"], c_done),
            )
            await until_queued(encoder, 3)
            encoder.release_hold()
            results = await streams
        got = dict(zip("abcd", results))
        assert [b[0] for _, _, b in results[:3]] == [3, 3, 3]  # streams really shared a batch
        for sid in plan:
            want_codes, want_pcm = solo(tiny_mimi, inputs[sid])
            assert got[sid][0] == want_codes, sid
            # PCM is float: batch-size-dependent kernels may differ in the last bits
            got_pcm = np.frombuffer(b"".join(got[sid][1]), "<f4")
            want = np.frombuffer(b"".join(want_pcm), "<f4")
            assert np.allclose(got_pcm, want, rtol=1e-4, atol=1e-5), sid
        engine = running.servicer.engine
        assert engine.encoder.slots_in_use == 0 and engine.decoder.slots_in_use == 0
    finally:
        await running.stop(0)


async def expect_error(call, code: grpc.StatusCode, *needles: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == code, info.value.details()
    for needle in needles:
        assert needle in info.value.details(), info.value.details()


async def test_bad_inputs_get_their_status_and_others_keep_going() -> None:
    running = await start_codec_server(ServerConfig(), CodecOptions(model="echo", max_sessions=3))
    ok = np.zeros(FRAME, dtype="<f4")
    nan = ok.copy()
    nan[5] = np.nan
    inf = ok.copy()
    inf[7] = np.inf
    S = grpc.StatusCode
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            bystander = stub.Encode()
            await bystander.write(enc_open("bystander"))
            step = 0

            async def bystander_step():
                nonlocal step
                await bystander.write(enc_frame(step, audio(9, 1)[0].tobytes()))
                assert (await bystander.read()).index == step
                step += 1

            await bystander_step()
            cases = [
                (
                    lambda: stub.Encode(iter([enc_frame(0, ok.tobytes())])),
                    S.FAILED_PRECONDITION,
                    ["open"],
                ),
                (
                    lambda: stub.Encode(iter([enc_open("x"), enc_open("x")])),
                    S.FAILED_PRECONDITION,
                    ["second"],
                ),
                (
                    lambda: stub.Encode(iter([enc_open("x"), enc_frame(0, b"\0" * 100)])),
                    S.INVALID_ARGUMENT,
                    ["7680 bytes", "got 100"],
                ),
                (
                    lambda: stub.Encode(iter([enc_open("x"), enc_frame(0, nan.tobytes())])),
                    S.INVALID_ARGUMENT,
                    ["NaN/Inf"],
                ),
                (
                    lambda: stub.Encode(iter([enc_open("x"), enc_frame(0, inf.tobytes())])),
                    S.INVALID_ARGUMENT,
                    ["NaN/Inf"],
                ),
                (
                    lambda: stub.Encode(iter([enc_open("x"), enc_frame(3, ok.tobytes())])),
                    S.FAILED_PRECONDITION,
                    ["expected 0"],
                ),
                (
                    lambda: stub.Encode(iter([codec_pb2.EncodeRequest()])),
                    S.INVALID_ARGUMENT,
                    ["neither"],
                ),
                (
                    lambda: stub.Decode(iter([dec_open("x"), dec_frame(0, [1] * 7)])),
                    S.INVALID_ARGUMENT,
                    ["8 codes", "got 7"],
                ),
                (
                    lambda: stub.Decode(iter([dec_open("x"), dec_frame(0, [0] * 7 + [2048])])),
                    S.INVALID_ARGUMENT,
                    ["codes[7] = 2048", "[0, 2048)"],
                ),
                (
                    lambda: stub.Decode(iter([dec_open("x"), dec_frame(0, [-1] + [0] * 7)])),
                    S.INVALID_ARGUMENT,
                    ["out of range"],
                ),
            ]
            for make_call, code, needles in cases:  # one at a time: a call starts when made
                await expect_error(make_call(), code, *needles)
                await bystander_step()
            # a message from a newer contract version (an unknown field in `open`)
            newer = enc_open("x")
            newer.open.MergeFromString(bytes([0x78, 0x01]))  # field 15 (varint): unknown
            await expect_error(stub.Encode(iter([newer])), S.INVALID_ARGUMENT, "newer")
            await bystander_step()
            await bystander.done_writing()
            assert await bystander.code() == S.OK
            info = await stub.Info(common_pb2.InfoRequest())
            assert info.slots_in_use == 0 and info.slots_total == 3
    finally:
        await running.stop(0)


async def test_capacity_refusal_then_slot_reuse() -> None:
    running = await start_codec_server(ServerConfig(), CodecOptions(model="echo", max_sessions=2))
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            holders = []
            for i in range(2):
                call = stub.Decode()
                await call.write(dec_open(f"h{i}"))
                await call.write(dec_frame(0, [5] * 8))
                await call.read()
                holders.append(call)
            info = await stub.Info(common_pb2.InfoRequest())
            assert info.slots_in_use == 2
            await expect_error(
                stub.Decode(iter([dec_open("extra")])),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "all 2 codec-decode slots are in use",
            )
            # Encode slots are separate from Decode slots
            outs = [o async for o in stub.Encode(iter([enc_open("e"), enc_frame(0, b"\0" * 7680)]))]
            assert len(outs) == 1
            holders[0].cancel()  # a client that vanishes frees its slot
            for _ in range(100):
                if (await stub.Info(common_pb2.InfoRequest())).slots_in_use == 1:
                    break
                await asyncio.sleep(0.02)
            outs = [o async for o in stub.Decode(iter([dec_open("late"), dec_frame(0, [9] * 8)]))]
            assert len(outs) == 1
            # echo decode is a pure function of the codes
            level = 9 / 1024 - 1
            assert np.allclose(np.frombuffer(outs[0].pcm_f32le, "<f4"), level)
            await holders[1].done_writing()
            assert await holders[1].code() == grpc.StatusCode.OK
    finally:
        await running.stop(0)


async def test_info_reports_model_and_recent_step_times() -> None:
    running = await start_codec_server(
        ServerConfig(), CodecOptions(model="echo", max_sessions=5, inject_delay_ms=5)
    )
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            before = await stub.Info(common_pb2.InfoRequest())
            assert before.step_p50_ms == 0
            reqs = [enc_open("i")] + [enc_frame(i, b"\0" * 7680) for i in range(3)]
            outs = [o async for o in stub.Encode(iter(reqs))]
            assert all(o.timing.compute_ms > 0 and o.timing.batch_size == 1 for o in outs)
            info = await stub.Info(common_pb2.InfoRequest())
        assert info.model_name == "mimi-echo" and info.config_name == "echo"
        assert info.slots_total == 5 and info.num_codebooks == 8
        assert info.sample_rate == 24000 and info.frame_size == 1920
        assert info.codebook_size == 2048 and info.text_vocab_size == 0
        assert info.version and info.step_p50_ms > 0 and info.step_p99_ms >= info.step_p50_ms
        # every bucket of the ladder warmed up at load, per stage; recent times per bucket
        buckets = {(b.stage, b.batch_size): b for b in info.buckets}
        assert set(buckets) == {(s, b) for s in ("encode", "decode") for b in (1, 2, 4, 5)}
        assert all(b.warm_ms > 0 for b in info.buckets)
        one = buckets[("encode", 1)]
        assert one.recent_count == 3 and one.recent_p50_ms >= 5.0  # the injected delay
        assert buckets[("encode", 2)].recent_count == 0 == buckets[("decode", 1)].recent_count
    finally:
        await running.stop(0)


async def test_streams_after_idle_probes_equal_solo_runs(tiny_mimi) -> None:
    """Idle probes step the model on free rows between sessions: a stream opened after
    several of them (every bucket re-timed, the rows it may take included) must still
    equal a fresh solo run, codes exactly and pcm to the last bit."""
    running = await start_codec_server(
        ServerConfig(),
        CodecOptions(max_sessions=4, max_wait_ms=0.0, idle_probe_s=0.01),
        load_model=lambda: tiny_mimi,
    )
    engine = running.servicer.engine
    frames = audio(5, 4)
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            await run_stream(stub, "before", audio(6, 3), None)  # rows used, then left
            for _ in range(2000):  # hang detector: both stages probed every bucket
                if min(engine.encoder.idle_probes, engine.decoder.idle_probes) >= 8:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("no idle probes ran")
            codes, pcm, _ = await run_stream(stub, "after", frames, None)
    finally:
        await running.stop(0)
    want_codes, want_pcm = solo(tiny_mimi, frames)
    assert codes == want_codes
    assert pcm == want_pcm
