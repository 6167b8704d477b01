"""Hypothesis fuzzing of every RPC of every service with random and garbled input.

For each RPC, random message sequences (wrong order, missing open/config, second opens,
huge/empty/odd-sized chunks, invalid enums, NaN/Inf, out-of-range codes and indices, random
bytes as frames and as raw serialized messages) go to one real in-process server stack
(echo models). Every example must end with a gRPC status from the documented set, well-formed
sequences must give exactly one output per frame, and after all examples:

- the server still answers SERVING and holds no slot (Info slots_in_use == 0);
- a *witness* session that stayed open on the same server during the whole fuzz run (one
  frame per example, interleaved with the garbage) produced outputs identical to a solo run
  of the same frames on a fresh stream.

Examples are bounded (max_examples ~25-40, deadline=None) so the file runs in well under a
minute on two cores. `FUZZ_STATS` counts the cases tried (printed at the end with -s). The
cases are the same every run (derandomized, for a stable CI); `MOSHI_FUZZ_RANDOM=1` draws
new ones (and `--hypothesis-seed` picks a seed).
"""

from __future__ import annotations

import math
import os
import queue
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from svc_harness import SERVING, LoopThread, channel, health_status_sync, run_stream

from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.services.common.status import status_code
from moshi_grpc.v1 import (
    codec_pb2,
    codec_pb2_grpc,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    lm_pb2,
    lm_pb2_grpc,
)

FRAME = 1920
K = 8
CARD = 2048
OK = grpc.StatusCode.OK
# Documented in protos/moshi_grpc/v1/*.proto (common.proto conventions).
BACKEND_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
GATEWAY_CODES = BACKEND_CODES | {grpc.StatusCode.DEADLINE_EXCEEDED}

FUZZ_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # Same cases every run by default (stable CI); MOSHI_FUZZ_RANDOM=1 explores new ones.
    derandomize=os.environ.get("MOSHI_FUZZ_RANDOM") != "1",
)

FUZZ_STATS: Counter[str] = Counter()


# ----------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    loop: LoopThread
    codec: Any
    lm: Any
    gateway: Any
    channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def ch(self, service: str) -> grpc.Channel:
        address = {
            "codec": self.codec.address,
            "lm": self.lm.address,
            "gateway": self.gateway.address,
        }[service]
        if service not in self.channels:
            self.channels[service] = channel(
                address, options=[("grpc.max_send_message_length", 16 * 1024 * 1024)]
            )
        return self.channels[service]

    def codec_info(self) -> common_pb2.BackendInfo:
        return codec_pb2_grpc.CodecStub(self.ch("codec")).Info(common_pb2.InfoRequest(), timeout=5)

    def lm_info(self) -> common_pb2.BackendInfo:
        return lm_pb2_grpc.LMStub(self.ch("lm")).Info(common_pb2.InfoRequest(), timeout=5)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    from moshi_grpc.services.codec.engine import CodecOptions
    from moshi_grpc.services.codec.startup import start_codec_server
    from moshi_grpc.services.gateway.cli import start_gateway
    from moshi_grpc.services.gateway.config import GatewaySettings
    from moshi_grpc.services.lm.engine import LmOptions
    from moshi_grpc.services.lm.startup import start_lm_server

    def config() -> ServerConfig:
        # 2 MiB messages: big enough for the "huge chunk" cases, small enough that the
        # over-limit cases are cheap.
        return ServerConfig(
            host="127.0.0.1",
            port=0,
            metrics_port=None,
            idle_timeout_s=120.0,
            max_message_bytes=2 * 1024 * 1024,
        )

    loop = LoopThread()
    codec = loop.run(start_codec_server(config(), CodecOptions(model="echo", max_sessions=96)))
    # Many slots: the gateway counts every session placed since its last Info poll as using
    # a slot even after it ended (see test_faults.py::test_burst_of_short_sessions...).
    lm = loop.run(start_lm_server(config(), LmOptions(model="echo", max_sessions=48)))
    gateway = loop.run(
        start_gateway(config(), codec.address, lm.address, GatewaySettings(idle_timeout_s=120.0))
    )
    s = Stack(loop, codec, lm, gateway)
    yield s
    for ch in s.channels.values():
        ch.close()
    loop.run(gateway.stop(0))
    loop.run(lm.stop(0))
    loop.run(codec.stop(0))
    loop.close()
    print(f"\nfuzz cases tried: {dict(FUZZ_STATS)} total {sum(FUZZ_STATS.values())}")


# ----------------------------------------------------------------------------- witness


class Witness:
    """A live stream driven one frame at a time between fuzz examples (sync client: the
    request iterator blocks on a queue, replies are read in the test thread)."""

    def __init__(self, method: Any, first: Any, *, timeout: float = 300.0) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self._queue.put(first)
        self._replies = method(iter(self._queue.get, None), timeout=timeout)
        self.replies: list[Any] = []

    def send(self, message: Any) -> None:
        self._queue.put(message)

    def read(self) -> Any:
        reply = next(self._replies)
        self.replies.append(reply)
        return reply

    def finish(self) -> list[Any]:
        self._queue.put(None)
        self.replies.extend(self._replies)
        return self.replies


def _pcm(seed: int, n: int = FRAME, scale: float = 0.5) -> bytes:
    rng = np.random.default_rng(seed)
    return rng.uniform(-scale, scale, n).astype("<f4").tobytes()


def _codes(seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, CARD, K).tolist()


# ----------------------------------------------------------------------------- strategies

# Indices: mostly plausible, sometimes anything a uint64 can hold.
indices = st.one_of(st.integers(0, 3), st.integers(0, 2**64 - 1))
weird_floats = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def pcm_payloads(draw) -> bytes:
    """float32 LE audio payloads: right-sized, empty, odd-sized, huge, NaN/Inf, random bytes."""
    kind = draw(
        st.sampled_from(
            ["frame", "empty", "odd", "short", "long", "huge", "nonfinite", "random_frame", "tiny"]
        )
    )
    seed = draw(st.integers(0, 2**16))
    if kind == "frame":
        return _pcm(seed)
    if kind == "empty":
        return b""
    if kind == "odd":
        return _pcm(seed)[: draw(st.integers(1, 4 * FRAME - 1))] + b"\x01"
    if kind == "short":
        return _pcm(seed, draw(st.integers(1, FRAME - 1)))
    if kind == "long":
        return _pcm(seed, draw(st.integers(FRAME + 1, 3 * FRAME)))
    if kind == "huge":
        # Over the server's 2 MiB limit or just under it.
        return bytes(draw(st.sampled_from([2 * 1024 * 1024 + 8, 1024 * 1024])))
    if kind == "nonfinite":
        samples = np.frombuffer(_pcm(seed), dtype="<f4").copy()
        samples[draw(st.integers(0, FRAME - 1))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf])
        )
        return samples.tobytes()
    if kind == "random_frame":
        return draw(st.binary(min_size=4 * FRAME, max_size=4 * FRAME))
    return draw(st.binary(max_size=16))


code_lists = st.one_of(
    st.lists(st.integers(0, CARD - 1), min_size=K, max_size=K),
    st.lists(st.integers(-(2**31), 2**31 - 1), min_size=K, max_size=K),
    st.lists(st.integers(-(2**31), 2**31 - 1), max_size=3 * K),
    st.just([]),
)


def encode_requests() -> st.SearchStrategy:
    return st.one_of(
        st.builds(
            lambda sid: codec_pb2.EncodeRequest(open=codec_pb2.CodecOpen(session_id=sid)),
            st.text(max_size=40),
        ),
        st.builds(
            lambda i, pcm: codec_pb2.EncodeRequest(
                frame=codec_pb2.PcmFrame(index=i, pcm_f32le=pcm)
            ),
            indices,
            pcm_payloads(),
        ),
        st.just(codec_pb2.EncodeRequest()),
    )


def decode_requests() -> st.SearchStrategy:
    return st.one_of(
        st.just(codec_pb2.DecodeRequest(open=codec_pb2.CodecOpen())),
        st.builds(
            lambda i, c: codec_pb2.DecodeRequest(frame=codec_pb2.CodesFrame(index=i, codes=c)),
            indices,
            code_lists,
        ),
        st.just(codec_pb2.DecodeRequest()),
    )


@st.composite
def sampling_params(draw) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams()
    for name in ("text_temperature", "audio_temperature"):
        if draw(st.booleans()):
            setattr(params, name, draw(st.one_of(st.sampled_from([0.0, 0.7, 1.0]), weird_floats)))
    for name in ("text_top_k", "audio_top_k"):
        if draw(st.booleans()):
            setattr(
                params, name, draw(st.one_of(st.integers(0, 300), st.integers(-(2**31), 2**31 - 1)))
            )
    return params


@st.composite
def replay_steps(draw) -> list[lm_pb2.ReplayStep]:
    steps = []
    for _ in range(draw(st.integers(0, 3))):
        step = lm_pb2.ReplayStep(user_codes=draw(code_lists))
        if draw(st.booleans()):
            step.text_token = draw(
                st.one_of(st.integers(0, 31999), st.integers(-(2**31), 2**31 - 1))
            )
            step.moshi_codes.extend(draw(code_lists))
        steps.append(step)
    return steps


@st.composite
def lm_open(draw) -> lm_pb2.StepRequest:
    msg = lm_pb2.LmOpen(session_id=draw(st.text(max_size=20)), sampling=draw(sampling_params()))
    if draw(st.booleans()):
        msg.seed = draw(st.integers(0, 2**64 - 1))
    msg.replay.extend(draw(replay_steps()))
    return lm_pb2.StepRequest(open=msg)


def step_requests() -> st.SearchStrategy:
    return st.one_of(
        lm_open(),
        st.builds(
            lambda i, c: lm_pb2.StepRequest(frame=lm_pb2.UserCodes(index=i, codes=c)),
            indices,
            code_lists,
        ),
        st.just(lm_pb2.StepRequest()),
    )


@st.composite
def session_configs(draw) -> gateway_pb2.ConverseRequest:
    cfg = gateway_pb2.SessionConfig(
        sample_rate=draw(
            st.one_of(
                st.sampled_from([8000, 16000, 24000, 44100, 48000]),
                st.integers(-(2**31), 2**31 - 1),
            )
        ),
        # Open enums: any int32 goes over the wire.
        encoding=draw(st.one_of(st.sampled_from([1, 2]), st.integers(-3, 2**31 - 1))),
        sampling=draw(sampling_params()),
        client_id=draw(st.text(max_size=30)),
    )
    if draw(st.booleans()):
        cfg.seed = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        cfg.budget_ms = draw(st.one_of(st.integers(0, 20_000), st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        cfg.max_consecutive_misses = draw(st.integers(0, 2**32 - 1))
    return gateway_pb2.ConverseRequest(config=cfg)


@st.composite
def audio_chunks(draw) -> gateway_pb2.ConverseRequest:
    kind = draw(st.sampled_from(["f32", "pcm16", "odd", "empty", "random", "nonfinite", "big"]))
    seed = draw(st.integers(0, 2**16))
    if kind == "f32":
        data = _pcm(seed, draw(st.integers(1, 3 * FRAME)))
    elif kind == "pcm16":
        n = draw(st.integers(1, 3 * FRAME))
        data = np.random.default_rng(seed).integers(-32768, 32767, n).astype("<i2").tobytes()
    elif kind == "odd":
        data = draw(st.binary(min_size=1, max_size=31).filter(lambda b: len(b) % 2 == 1))
    elif kind == "empty":
        data = b""
    elif kind == "random":
        data = draw(st.binary(max_size=2048))
    elif kind == "nonfinite":
        data = _pcm(seed, 64)[:-4] + struct.pack("<f", draw(st.sampled_from([math.nan, math.inf])))
    else:
        data = _pcm(seed, draw(st.sampled_from([48_000, 300_000])))  # 1 s at 48 kHz, > 1 MiB
    return gateway_pb2.ConverseRequest(audio=gateway_pb2.AudioChunk(data=data))


converse_requests = st.one_of(
    session_configs(), audio_chunks(), st.just(gateway_pb2.ConverseRequest())
)


def sequences(first: st.SearchStrategy, rest: st.SearchStrategy) -> st.SearchStrategy:
    """Half the time a plausible first message, then anything (order errors included)."""
    return st.one_of(
        st.tuples(first, st.lists(rest, max_size=5)).map(lambda t: [t[0], *t[1]]),
        st.lists(rest, max_size=6),
    )


# ----------------------------------------------------------------------------- validity


def _valid_backend_sequence(messages: list, check_payload) -> int | None:
    """Number of frames if the sequence is an open then well-formed in-order frames."""
    if not messages or messages[0].WhichOneof("kind") != "open":
        return None
    for i, m in enumerate(messages[1:]):
        if m.WhichOneof("kind") != "frame" or m.frame.index != i or not check_payload(m.frame):
            return None
    return len(messages) - 1


def _pcm_ok(frame) -> bool:
    data = frame.pcm_f32le
    return len(data) == 4 * FRAME and bool(np.isfinite(np.frombuffer(data, "<f4")).all())


def _codes_ok(codes) -> bool:
    return len(codes) == K and all(0 <= c < CARD for c in codes)


def _open_ok(message) -> bool:
    o = message.open
    s = o.sampling
    for name in ("text_temperature", "audio_temperature"):
        if s.HasField(name) and not (math.isfinite(getattr(s, name)) and getattr(s, name) >= 0):
            return False
    for name in ("text_top_k", "audio_top_k"):
        if s.HasField(name) and getattr(s, name) < 0:
            return False
    return not o.replay


def _check(code: grpc.StatusCode, details: str, allowed: set, what: str) -> None:
    FUZZ_STATS[what] += 1
    assert code in allowed, f"{what}: {code.name} {details!r}"
    if code != OK:
        assert details, f"{what}: {code.name} without a message"


# ----------------------------------------------------------------------------- tests


def _codec_witness(stack: Stack) -> Witness:
    stub = codec_pb2_grpc.CodecStub(stack.ch("codec"))
    return Witness(stub.Encode, codec_pb2.EncodeRequest(open=codec_pb2.CodecOpen(session_id="w")))


def _witness_step_encode(w: Witness, i: int) -> None:
    w.send(codec_pb2.EncodeRequest(frame=codec_pb2.PcmFrame(index=i, pcm_f32le=_pcm(1000 + i))))
    assert w.read().index == i


def _after(stack: Stack, service: str) -> None:
    address = getattr(stack, service).address
    assert health_status_sync(address) == SERVING


def test_fuzz_codec_encode(stack: Stack) -> None:
    witness = _codec_witness(stack)
    count = [0]
    method = codec_pb2_grpc.CodecStub(stack.ch("codec")).Encode

    @FUZZ_SETTINGS
    @given(messages=sequences(encode_requests(), encode_requests()))
    def fuzz(messages: list) -> None:
        code, details, replies = run_stream(method, messages)
        _check(code, details, BACKEND_CODES, "codec.Encode")
        frames = _valid_backend_sequence(messages, _pcm_ok)
        if frames is not None:
            assert code == OK, details
            assert [r.index for r in replies] == list(range(frames))
            assert all(len(r.codes) == K and all(0 <= c < CARD for c in r.codes) for r in replies)
        _witness_step_encode(witness, count[0])
        count[0] += 1

    fuzz()
    got = [list(r.codes) for r in witness.finish()]
    solo_msgs = [codec_pb2.EncodeRequest(open=codec_pb2.CodecOpen())] + [
        codec_pb2.EncodeRequest(frame=codec_pb2.PcmFrame(index=i, pcm_f32le=_pcm(1000 + i)))
        for i in range(count[0])
    ]
    code, _, solo = run_stream(method, solo_msgs, timeout=60)
    assert code == OK
    assert got == [list(r.codes) for r in solo]
    _after(stack, "codec")
    assert stack.codec_info().slots_in_use == 0


def test_fuzz_codec_decode(stack: Stack) -> None:
    stub = codec_pb2_grpc.CodecStub(stack.ch("codec"))
    witness = Witness(stub.Decode, codec_pb2.DecodeRequest(open=codec_pb2.CodecOpen()))
    count = [0]

    @FUZZ_SETTINGS
    @given(messages=sequences(decode_requests(), decode_requests()))
    def fuzz(messages: list) -> None:
        code, details, replies = run_stream(stub.Decode, messages)
        _check(code, details, BACKEND_CODES, "codec.Decode")
        frames = _valid_backend_sequence(messages, lambda f: _codes_ok(f.codes))
        if frames is not None:
            assert code == OK, details
            assert [r.index for r in replies] == list(range(frames))
            assert all(len(r.pcm_f32le) == 4 * FRAME for r in replies)
        i = count[0]
        witness.send(codec_pb2.DecodeRequest(frame=codec_pb2.CodesFrame(index=i, codes=_codes(i))))
        assert witness.read().index == i
        count[0] += 1

    fuzz()
    got = [r.pcm_f32le for r in witness.finish()]
    solo_msgs = [codec_pb2.DecodeRequest(open=codec_pb2.CodecOpen())] + [
        codec_pb2.DecodeRequest(frame=codec_pb2.CodesFrame(index=i, codes=_codes(i)))
        for i in range(count[0])
    ]
    code, _, solo = run_stream(stub.Decode, solo_msgs, timeout=60)
    assert code == OK
    assert got == [r.pcm_f32le for r in solo]
    _after(stack, "codec")
    assert stack.codec_info().slots_in_use == 0


def _step_key(r: lm_pb2.StepOutput) -> tuple:
    return (r.index, r.ready, r.text_token, r.text_piece, tuple(r.moshi_codes))


def test_fuzz_lm_step(stack: Stack) -> None:
    stub = lm_pb2_grpc.LMStub(stack.ch("lm"))
    open_msg = lm_pb2.StepRequest(open=lm_pb2.LmOpen(seed=42))
    witness = Witness(stub.Step, open_msg)
    count = [0]

    @FUZZ_SETTINGS
    @given(messages=sequences(lm_open(), step_requests()))
    def fuzz(messages: list) -> None:
        code, details, replies = run_stream(stub.Step, messages)
        _check(code, details, BACKEND_CODES, "lm.Step")
        frames = _valid_backend_sequence(messages, lambda f: _codes_ok(f.codes))
        if frames is not None and _open_ok(messages[0]):
            assert code == OK, details
            assert [r.index for r in replies] == list(range(frames))
        i = count[0]
        witness.send(lm_pb2.StepRequest(frame=lm_pb2.UserCodes(index=i, codes=_codes(i))))
        assert witness.read().index == i
        count[0] += 1

    fuzz()
    got = [_step_key(r) for r in witness.finish()]
    solo_msgs = [open_msg] + [
        lm_pb2.StepRequest(frame=lm_pb2.UserCodes(index=i, codes=_codes(i)))
        for i in range(count[0])
    ]
    code, _, solo = run_stream(stub.Step, solo_msgs, timeout=60)
    assert code == OK
    assert got == [_step_key(r) for r in solo]
    assert any(r[1] for r in got)  # the witness got past the acoustic delay
    _after(stack, "lm")
    assert stack.lm_info().slots_in_use == 0


# ----------------------------------------------------------------------------- mux


def mux_requests(entry_type: type, request_type: type, per_session: st.SearchStrategy):
    """Mux messages: entries of a few session ids, each what a per-session message carries
    (open / frame / nothing) or a close / cancel, so ids collide, frames come for sessions
    that are not open, opens repeat, and so on."""

    def entry(sid: int, choice: str, msg: Any) -> Any:
        e = entry_type(session=sid)
        if choice == "close":
            e.close = True
        elif choice == "cancel":
            e.cancel = True
        else:
            kind = msg.WhichOneof("kind")
            if kind is not None:
                getattr(e, kind).CopyFrom(getattr(msg, kind))
        return e

    entries = st.builds(
        entry,
        st.sampled_from([0, 1, 2, 2**64 - 1]),
        st.sampled_from(["msg", "msg", "msg", "close", "cancel"]),
        per_session,
    )
    return st.lists(
        st.lists(entries, max_size=6).map(lambda es: request_type(entries=es)), max_size=4
    )


def _fuzz_mux(method: Any, messages: list, what: str) -> None:
    code, details, replies = run_stream(method, messages)
    _check(code, details, BACKEND_CODES, what)
    for reply in replies:
        for result in reply.results:
            if result.WhichOneof("kind") == "end":  # a session's own status, with a reason
                status = status_code(result.end.code)
                _check(status, result.end.message, BACKEND_CODES, f"{what} session")
                if status != OK:
                    FUZZ_STATS[f"{what} session error"] += 1


def test_fuzz_codec_encode_mux(stack: Stack) -> None:
    """Any EncodeMux traffic: statuses from the documented set, slots all freed, and a
    per-session witness stream beside it unaffected."""
    witness = _codec_witness(stack)
    method = codec_pb2_grpc.CodecStub(stack.ch("codec")).EncodeMux
    count = [0]

    @FUZZ_SETTINGS
    @given(
        messages=mux_requests(
            codec_pb2.EncodeMuxEntry, codec_pb2.EncodeMuxRequest, encode_requests()
        )
    )
    def fuzz(messages: list) -> None:
        _fuzz_mux(method, messages, "codec.EncodeMux")
        _witness_step_encode(witness, count[0])
        count[0] += 1

    fuzz()
    assert FUZZ_STATS["codec.EncodeMux session error"] > 0  # the error paths were reached
    assert len(witness.finish()) == count[0]
    _after(stack, "codec")
    assert stack.codec_info().slots_in_use == 0


def test_fuzz_lm_step_mux(stack: Stack) -> None:
    method = lm_pb2_grpc.LMStub(stack.ch("lm")).StepMux

    @FUZZ_SETTINGS
    @given(messages=mux_requests(lm_pb2.StepMuxEntry, lm_pb2.StepMuxRequest, step_requests()))
    def fuzz(messages: list) -> None:
        _fuzz_mux(method, messages, "lm.StepMux")

    fuzz()
    assert FUZZ_STATS["lm.StepMux session error"] > 0  # the error paths were reached
    _after(stack, "lm")
    assert stack.lm_info().slots_in_use == 0


WITNESS_CONFIG = gateway_pb2.ConverseRequest(
    config=gateway_pb2.SessionConfig(
        sample_rate=24000,
        encoding=gateway_pb2.AUDIO_ENCODING_FLOAT32,
        seed=5,
        budget_ms=10_000,
        max_consecutive_misses=0,
        client_id="witness",
    )
)


def _converse_outputs(replies: list) -> list[tuple]:
    """What must match a solo run: audio frames (index, bytes, silence) and text pieces."""
    out = []
    for r in replies:
        kind = r.WhichOneof("kind")
        if kind == "audio":
            out.append(("audio", r.audio.frame_index, r.audio.data, r.audio.silence))
        elif kind == "text":
            out.append(("text", r.text.frame_index, r.text.text))
    return out


def _read_until_audio(w: Witness, index: int) -> None:
    while True:
        r = w.read()
        if r.WhichOneof("kind") == "audio" and r.audio.frame_index == index:
            return


def test_fuzz_gateway_converse(stack: Stack) -> None:
    stub = gateway_pb2_grpc.GatewayStub(stack.ch("gateway"))
    witness = Witness(stub.Converse, WITNESS_CONFIG)
    count = [0]

    @FUZZ_SETTINGS
    @given(messages=sequences(session_configs(), converse_requests))
    def fuzz(messages: list) -> None:
        code, details, replies = run_stream(stub.Converse, messages, timeout=30)
        _check(code, details, GATEWAY_CODES, "gateway.Converse")
        if code == OK:
            ended = [
                r.event.ended.summary
                for r in replies
                if r.WhichOneof("kind") == "event" and r.event.WhichOneof("kind") == "ended"
            ]
            assert len(ended) == 1
            audio = [r for r in replies if r.WhichOneof("kind") == "audio"]
            assert ended[0].frames_in == ended[0].frames_out == len(audio)
            assert [a.audio.frame_index for a in audio] == list(range(len(audio)))
        i = count[0]
        witness.send(gateway_pb2.ConverseRequest(audio=gateway_pb2.AudioChunk(data=_pcm(500 + i))))
        _read_until_audio(witness, i)
        count[0] += 1

    fuzz()
    got = _converse_outputs(witness.finish())
    # The solo run is driven the same way (one chunk, then its output): a client sending
    # faster than real time gets frames dropped past the backlog, by design.
    solo = Witness(stub.Converse, WITNESS_CONFIG)
    for i in range(count[0]):
        solo.send(gateway_pb2.ConverseRequest(audio=gateway_pb2.AudioChunk(data=_pcm(500 + i))))
        _read_until_audio(solo, i)
    assert got == _converse_outputs(solo.finish())
    assert not any(item[0] == "audio" and item[3] for item in got[-3:])  # real audio, not silence
    _after(stack, "gateway")
    assert stack.codec_info().slots_in_use == 0
    assert stack.lm_info().slots_in_use == 0


RAW_METHODS = [
    ("codec", "/moshi_grpc.v1.Codec/Encode", codec_pb2.EncodeRequest),
    ("codec", "/moshi_grpc.v1.Codec/Decode", codec_pb2.DecodeRequest),
    ("lm", "/moshi_grpc.v1.LM/Step", lm_pb2.StepRequest),
    ("gateway", "/moshi_grpc.v1.Gateway/Converse", gateway_pb2.ConverseRequest),
]


def _parses(message_type: Any, data: bytes) -> bool:
    try:
        message_type.FromString(data)
    except DecodeError:
        return False
    return True


@FUZZ_SETTINGS
@given(
    target=st.sampled_from(RAW_METHODS),
    blobs=st.lists(st.binary(max_size=64), min_size=1, max_size=3),
)
def test_fuzz_raw_bytes_streams(stack: Stack, target: tuple, blobs: list[bytes]) -> None:
    """Random bytes as serialized messages: every outcome is a documented status (unparseable
    bytes are INVALID_ARGUMENT), never a hang or crash."""
    service, path, message_type = target
    method = stack.ch(service).stream_stream(path)  # no serializers: raw bytes on the wire
    code, details, _ = run_stream(method, blobs)
    allowed = set(GATEWAY_CODES if service == "gateway" else BACKEND_CODES)
    _check(code, details, allowed, "raw." + path.rsplit("/", 1)[1])
    assert health_status_sync(getattr(stack, service).address) == SERVING


@FUZZ_SETTINGS
@given(target=st.sampled_from(["Codec", "LM"]), blob=st.binary(max_size=64))
def test_fuzz_info_raw_bytes(stack: Stack, target: str, blob: bytes) -> None:
    """Info answers (or refuses) any bytes as its request, and the replica stays healthy."""
    ch = stack.ch("codec" if target == "Codec" else "lm")
    call = ch.unary_unary(
        f"/moshi_grpc.v1.{target}/Info", response_deserializer=common_pb2.BackendInfo.FromString
    )
    FUZZ_STATS[f"raw.{target}.Info"] += 1
    try:
        info = call(blob, timeout=5)
    except grpc.RpcError as err:
        # Unparseable bytes are bad input: INVALID_ARGUMENT with a message, never INTERNAL
        # or UNKNOWN (docs/RELIABILITY.md; finding 3).
        assert not _parses(common_pb2.InfoRequest, blob), err
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        assert err.details()
    else:
        assert info.slots_total > 0


@pytest.mark.parametrize("service,path,message_type", RAW_METHODS)
def test_corrupt_stream_message_is_invalid_argument(
    stack: Stack, service: str, path: str, message_type: Any
) -> None:
    blob = b"\xff\xff\xff"
    assert not _parses(message_type, blob)
    method = stack.ch(service).stream_stream(path)
    code, details, _ = run_stream(method, [blob])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)


@pytest.mark.parametrize("target", ["Codec", "LM"])
def test_corrupt_info_request_is_invalid_argument(stack: Stack, target: str) -> None:
    ch = stack.ch("codec" if target == "Codec" else "lm")
    call = ch.unary_unary(f"/moshi_grpc.v1.{target}/Info")
    with pytest.raises(grpc.RpcError) as err:
        call(b"\xff\xff\xff", timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
