"""Security: bearer-token auth on every service, TLS and mTLS with certificates generated at
test time, backends refusing plain connections when TLS is on, message size and RPC limits,
session length limits, and no secrets in logs.

Every test runs real grpc.aio servers on 127.0.0.1 port 0 (echo models: no model cost).
"""

from __future__ import annotations

import asyncio
import inspect
import re
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
from svc_harness import SERVING, ServiceProcess, channel, health_status, run_stream
from tls_certs import Pki, make_pki

from moshi_grpc.services.common import interceptors
from moshi_grpc.services.common import server as server_mod
from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.v1 import (
    codec_pb2,
    codec_pb2_grpc,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    lm_pb2,
    lm_pb2_grpc,
)

TOKEN = "s3cr3t-t0ken-for-tests-7f1c"
FRAME = 1920


# ----------------------------------------------------------------------------- servers


def _config(**kw) -> ServerConfig:
    kw.setdefault("metrics_port", None)
    kw.setdefault("idle_timeout_s", 10.0)
    return ServerConfig(host="127.0.0.1", port=0, **kw)


async def start_codec(**kw):
    from moshi_grpc.services.codec.engine import CodecOptions
    from moshi_grpc.services.codec.startup import start_codec_server

    return await start_codec_server(_config(**kw), CodecOptions(model="echo", max_sessions=4))


async def start_lm(**kw):
    from moshi_grpc.services.lm.startup import start_lm_server

    return await start_lm_server(_config(**kw), _lm_options())


def _lm_options():
    from moshi_grpc.services.lm.engine import LmOptions

    return LmOptions(model="echo", max_sessions=4)


async def start_gateway(codec_addr: str, lm_addr: str, channels=None, settings=None, **kw):
    from moshi_grpc.services.gateway.cli import start_gateway as _start

    return await _start(_config(**kw), codec_addr, lm_addr, settings, channels)


def _pcm_frame(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.5, 0.5, FRAME).astype("<f4").tobytes()


# ----------------------------------------------------------------------------- calls


class StreamFailed(Exception):
    """A stream or call ended with a non-OK status (code, details)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class Conn:
    """Where a test dials: address plus optional TLS credentials. Calls use the sync client
    in a worker thread (see svc_harness.run_stream for why not grpc.aio)."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        self.credentials = credentials

    def _stream(self, stub_cls, name: str, messages, metadata, timeout: float) -> list:
        with channel(self.address, self.credentials) as ch:
            method = getattr(stub_cls(ch), name)
            code, details, replies = run_stream(
                method, messages, metadata=metadata, timeout=timeout
            )
        if code != grpc.StatusCode.OK:
            raise StreamFailed(code, details)
        return replies

    def _unary(self, stub_cls, name: str, request, metadata, timeout: float = 10.0):
        with channel(self.address, self.credentials) as ch:
            try:
                return getattr(stub_cls(ch), name)(request, metadata=metadata, timeout=timeout)
            except grpc.RpcError as err:
                raise StreamFailed(err.code(), err.details() or "") from None

    async def stream(self, stub_cls, name: str, messages, metadata=(), timeout: float = 10.0):
        return await asyncio.to_thread(
            self._stream, stub_cls, name, list(messages), tuple(metadata), timeout
        )

    async def unary(self, stub_cls, name: str, request, metadata=()):
        return await asyncio.to_thread(self._unary, stub_cls, name, request, tuple(metadata))


def _conn(address: str, credentials: grpc.ChannelCredentials | None = None) -> Conn:
    return Conn(address, credentials)


async def _encode(conn: Conn, metadata=(), frames: int = 2) -> list:
    messages = [codec_pb2.EncodeRequest(open=codec_pb2.CodecOpen(session_id="sec"))]
    messages += [
        codec_pb2.EncodeRequest(frame=codec_pb2.PcmFrame(index=i, pcm_f32le=_pcm_frame(i)))
        for i in range(frames)
    ]
    return await conn.stream(codec_pb2_grpc.CodecStub, "Encode", messages, metadata)


async def _decode(conn: Conn, metadata=()) -> list:
    messages = [
        codec_pb2.DecodeRequest(open=codec_pb2.CodecOpen()),
        codec_pb2.DecodeRequest(frame=codec_pb2.CodesFrame(index=0, codes=[1] * 8)),
    ]
    return await conn.stream(codec_pb2_grpc.CodecStub, "Decode", messages, metadata)


async def _codec_info(conn: Conn, metadata=()):
    return await conn.unary(codec_pb2_grpc.CodecStub, "Info", common_pb2.InfoRequest(), metadata)


async def _step(conn: Conn, metadata=()) -> list:
    messages = [
        lm_pb2.StepRequest(open=lm_pb2.LmOpen(seed=1)),
        lm_pb2.StepRequest(frame=lm_pb2.UserCodes(index=0, codes=[1] * 8)),
    ]
    return await conn.stream(lm_pb2_grpc.LMStub, "Step", messages, metadata)


async def _lm_info(conn: Conn, metadata=()):
    return await conn.unary(lm_pb2_grpc.LMStub, "Info", common_pb2.InfoRequest(), metadata)


def _session_config(**kw) -> gateway_pb2.ConverseRequest:
    kw.setdefault("sample_rate", 24000)
    kw.setdefault("encoding", gateway_pb2.AUDIO_ENCODING_FLOAT32)
    kw.setdefault("seed", 7)
    kw.setdefault("budget_ms", 5000)
    return gateway_pb2.ConverseRequest(config=gateway_pb2.SessionConfig(**kw))


async def _converse(conn: Conn, metadata=(), frames: int = 3) -> list:
    messages = [_session_config()]
    messages += [
        gateway_pb2.ConverseRequest(audio=gateway_pb2.AudioChunk(data=_pcm_frame(i)))
        for i in range(frames)
    ]
    return await conn.stream(
        gateway_pb2_grpc.GatewayStub, "Converse", messages, metadata, timeout=20
    )


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


WRONG_CREDENTIALS = {
    "missing": (),
    "wrong_token": _bearer("not-the-token"),
    "prefix_of_token": _bearer(TOKEN[:-1]),
    "token_plus_suffix": _bearer(TOKEN + "x"),
    "no_bearer_scheme": (("authorization", TOKEN),),
    "basic_scheme": (("authorization", f"Basic {TOKEN}"),),
    "empty_header": (("authorization", ""),),
}


async def _expect_unauthenticated(coro) -> str:
    with pytest.raises(StreamFailed) as err:
        await coro
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED, err.value
    return err.value.details


def _assert_uniform(details: dict[str, str]) -> None:
    """Every wrong credential gets the same message, which names neither the token nor
    which part was wrong."""
    messages = set(details.values())
    assert len(messages) == 1, details
    (message,) = messages
    assert TOKEN not in message
    for hint in ("missing", "wrong", "prefix", "scheme", "expected", "length"):
        assert hint not in message.lower().replace("missing or invalid", ""), message


# ----------------------------------------------------------------------------- auth


async def test_codec_token_auth_every_rpc() -> None:
    running = await start_codec(auth_token=TOKEN)
    try:
        conn = _conn(running.address)
        details: dict[str, str] = {}
        for name, md in WRONG_CREDENTIALS.items():
            details[f"encode/{name}"] = await _expect_unauthenticated(_encode(conn, md))
            details[f"decode/{name}"] = await _expect_unauthenticated(_decode(conn, md))
            details[f"info/{name}"] = await _expect_unauthenticated(_codec_info(conn, md))
        _assert_uniform(details)
        # The right token works on every RPC; health is exempt (probes carry no token).
        assert len(await _encode(conn, _bearer(TOKEN))) == 2
        assert len(await _decode(conn, _bearer(TOKEN))) == 1
        info = await _codec_info(conn, _bearer(TOKEN))
        assert info.model_name and info.slots_in_use == 0
        assert await health_status(running.address) == SERVING
    finally:
        await running.stop(0)


async def test_lm_token_auth_every_rpc() -> None:
    running = await start_lm(auth_token=TOKEN)
    try:
        conn = _conn(running.address)
        details: dict[str, str] = {}
        for name, md in WRONG_CREDENTIALS.items():
            details[f"step/{name}"] = await _expect_unauthenticated(_step(conn, md))
            details[f"info/{name}"] = await _expect_unauthenticated(_lm_info(conn, md))
        _assert_uniform(details)
        assert len(await _step(conn, _bearer(TOKEN))) == 1
        assert (await _lm_info(conn, _bearer(TOKEN))).model_name
        assert await health_status(running.address) == SERVING
    finally:
        await running.stop(0)


async def test_gateway_token_auth_and_backend_token() -> None:
    """Client -> gateway token and gateway -> backend token are separate secrets."""
    from moshi_grpc.services.gateway.discovery import ChannelSettings

    backend_token = "backend-" + TOKEN
    codec = await start_codec(auth_token=backend_token)
    lm = await start_lm(auth_token=backend_token)
    gateway = await start_gateway(
        codec.address,
        lm.address,
        channels=ChannelSettings(auth_token=backend_token),
        auth_token=TOKEN,
    )
    try:
        conn = _conn(gateway.address)
        details = {
            name: await _expect_unauthenticated(_converse(conn, md))
            for name, md in WRONG_CREDENTIALS.items()
        }
        # The backend token is not the gateway's token.
        details["backend_token"] = await _expect_unauthenticated(
            _converse(conn, _bearer(backend_token))
        )
        _assert_uniform(details)
        replies = await _converse(conn, _bearer(TOKEN))
        assert sum(r.WhichOneof("kind") == "audio" for r in replies) == 3
        assert await health_status(gateway.address) == SERVING
    finally:
        await gateway.stop(0)
        await codec.stop(0)
        await lm.stop(0)


async def test_gateway_without_backend_token_cannot_use_backends() -> None:
    """Backends with auth refuse a gateway that has no token: sessions fail with a clear,
    retryable status instead of hanging, and the token never shows up in the message."""
    codec = await start_codec(auth_token=TOKEN)
    lm = await start_lm(auth_token=TOKEN)
    gateway = await start_gateway(codec.address, lm.address)
    try:
        with pytest.raises(StreamFailed) as err:
            await _converse(_conn(gateway.address))
        assert err.value.code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ), err.value
        assert TOKEN not in err.value.details
    finally:
        await gateway.stop(0)
        await codec.stop(0)
        await lm.stop(0)


def test_token_compare_is_constant_time() -> None:
    """Code inspection: the bearer token is compared with hmac.compare_digest, never with
    `==`/`!=` or prefix checks that return early on the first differing byte."""
    source = inspect.getsource(interceptors.AuthInterceptor._authorized)
    assert "hmac.compare_digest" in source
    assert not re.search(r"(==|!=)\s*self\._expected|self\._expected\s*(==|!=)", source)
    assert not re.search(r"\.startswith\(|\.endswith\(|\bin\s+self\._expected", source)


def test_auth_refuses_empty_token() -> None:
    with pytest.raises(ValueError):
        interceptors.AuthInterceptor("")


# ----------------------------------------------------------------------------- TLS / mTLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _client_creds(pki: Pki, *, cert: bool = False, rogue: bool = False, ca: bytes | None = None):
    root = ca if ca is not None else pki.ca.cert_pem
    if rogue:
        return grpc.ssl_channel_credentials(
            root, pki.rogue_client.key_pem, pki.rogue_client.cert_pem
        )
    if cert:
        return grpc.ssl_channel_credentials(root, pki.client.key_pem, pki.client.cert_pem)
    return grpc.ssl_channel_credentials(root)


async def _connect_fails(conn: Conn) -> grpc.StatusCode:
    with pytest.raises(StreamFailed) as err:
        await _codec_info(conn)
    return err.value.code


async def test_codec_tls_refuses_plaintext_and_unknown_ca(pki: Pki) -> None:
    running = await start_codec(
        tls_cert=str(pki.path("server.crt")), tls_key=str(pki.path("server.key"))
    )
    try:
        assert running.tls
        conn = _conn(running.address, _client_creds(pki))
        assert len(await _encode(conn)) == 2
        assert (await _codec_info(conn)).slots_total == 4
        # A plaintext client gets no service at all.
        assert await _connect_fails(_conn(running.address)) == grpc.StatusCode.UNAVAILABLE
        # A client that trusts another CA refuses the server's certificate.
        rogue = _conn(running.address, _client_creds(pki, ca=pki.rogue_ca.cert_pem))
        assert await _connect_fails(rogue) == grpc.StatusCode.UNAVAILABLE
        # Health stays reachable over TLS.
        assert await health_status(running.address, credentials=_client_creds(pki)) == SERVING
    finally:
        await running.stop(0)


async def test_codec_mtls_requires_client_cert_from_trusted_ca(pki: Pki) -> None:
    running = await start_codec(
        tls_cert=str(pki.path("server.crt")),
        tls_key=str(pki.path("server.key")),
        tls_client_ca=str(pki.path("ca.crt")),
    )
    try:
        assert len(await _encode(_conn(running.address, _client_creds(pki, cert=True)))) == 2
        for creds in (_client_creds(pki), _client_creds(pki, rogue=True), None):
            code = await _connect_fails(_conn(running.address, creds))
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(0)


async def test_tls_and_token_together(pki: Pki) -> None:
    """TLS protects the token in transit; auth is still enforced over TLS."""
    running = await start_codec(
        tls_cert=str(pki.path("server.crt")), tls_key=str(pki.path("server.key")), auth_token=TOKEN
    )
    try:
        conn = _conn(running.address, _client_creds(pki))
        await _expect_unauthenticated(_codec_info(conn))
        assert (await _codec_info(conn, _bearer(TOKEN))).model_name
    finally:
        await running.stop(0)


def test_tls_config_errors_are_clear(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ValueError, match="both"):
        server_mod._credentials(ServerConfig(tls_cert=str(pki.path("server.crt"))))
    with pytest.raises(ValueError, match="not found"):
        server_mod._credentials(
            ServerConfig(tls_cert=str(tmp_path / "nope.crt"), tls_key=str(tmp_path / "nope.key"))
        )


async def test_gateway_reaches_tls_backends_only_with_their_ca(pki: Pki) -> None:
    """Backends with TLS on refuse the gateway's plain connections (no session admitted);
    with the CA configured the same stack serves; the public side can be TLS too."""
    from moshi_grpc.services.gateway.discovery import ChannelSettings

    tls = {"tls_cert": str(pki.path("server.crt")), "tls_key": str(pki.path("server.key"))}
    codec = await start_codec(**tls)
    lm = await start_lm(**tls)
    plain_gw = await start_gateway(codec.address, lm.address)
    tls_gw = await start_gateway(
        codec.address, lm.address, channels=ChannelSettings(tls_ca=pki.ca.cert_pem), **tls
    )
    try:
        with pytest.raises(StreamFailed) as err:
            await _converse(_conn(plain_gw.address))
        assert err.value.code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ), err.value
        replies = await _converse(_conn(tls_gw.address, _client_creds(pki)))
        assert sum(r.WhichOneof("kind") == "audio" for r in replies) == 3
        with pytest.raises(StreamFailed) as err:
            await _converse(_conn(tls_gw.address))
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        for srv in (plain_gw, tls_gw):
            await srv.stop(0)
        await codec.stop(0)
        await lm.stop(0)


# ----------------------------------------------------------------------------- limits


def _huge_encode(size: int) -> list:
    return [
        codec_pb2.EncodeRequest(open=codec_pb2.CodecOpen()),
        codec_pb2.EncodeRequest(frame=codec_pb2.PcmFrame(index=0, pcm_f32le=b"\0" * size)),
    ]


BIG_SEND = [("grpc.max_send_message_length", 64 * 1024 * 1024)]


@pytest.mark.parametrize(
    ("limit", "size"), [(64 * 1024, 128 * 1024), (None, 8 * 1024 * 1024)], ids=["64KiB", "default"]
)
async def test_message_size_limit(limit: int | None, size: int) -> None:
    """A message over --max-message-bytes (default 4 MiB) gets RESOURCE_EXHAUSTED before any
    handler runs; the server stays healthy and the next stream works."""
    running = await start_codec(**({"max_message_bytes": limit} if limit else {}))
    try:

        def huge() -> grpc.StatusCode:
            with channel(running.address, options=BIG_SEND) as ch:
                code, _, _ = run_stream(codec_pb2_grpc.CodecStub(ch).Encode, _huge_encode(size))
                return code

        assert await asyncio.to_thread(huge) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await health_status(running.address) == SERVING
        conn = _conn(running.address)
        assert len(await _encode(conn)) == 2
        assert (await _codec_info(conn)).slots_in_use == 0
    finally:
        await running.stop(0)


async def _hold_encode_streams(address: str, n: int) -> tuple[grpc.aio.Channel, list]:
    """Open n Encode streams that each processed one frame (they hold their slots)."""
    ch = grpc.aio.insecure_channel(address)
    stub = codec_pb2_grpc.CodecStub(ch)
    calls = []
    for _ in range(n):
        call = stub.Encode(timeout=30)
        await call.write(codec_pb2.EncodeRequest(open=codec_pb2.CodecOpen()))
        await call.write(
            codec_pb2.EncodeRequest(frame=codec_pb2.PcmFrame(index=0, pcm_f32le=_pcm_frame()))
        )
        await call.read()
        calls.append(call)
    return ch, calls


async def test_slots_limit_refuses_extra_streams() -> None:
    """Streams beyond --max-sessions get RESOURCE_EXHAUSTED (not a queue), and the slots come
    back when the streams end."""
    running = await start_codec()
    try:
        conn = _conn(running.address)
        ch, calls = await _hold_encode_streams(running.address, 4)
        assert (await _codec_info(conn)).slots_in_use == 4
        with pytest.raises(StreamFailed) as err:
            await _encode(conn)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in calls:
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
        await ch.close()
        assert (await _codec_info(conn)).slots_in_use == 0
        assert len(await _encode(conn)) == 2
    finally:
        await running.stop(0)


async def test_max_concurrent_rpcs_limit() -> None:
    running = await start_codec(max_concurrent_rpcs=2)
    try:
        conn = _conn(running.address)
        ch, calls = await _hold_encode_streams(running.address, 2)
        with pytest.raises(StreamFailed) as err:
            await _codec_info(conn)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in calls:
            await call.done_writing()
            await call.code()
        await ch.close()
        assert (await _codec_info(conn)).slots_total == 4
    finally:
        await running.stop(0)


async def test_idle_stream_is_ended_with_deadline_exceeded() -> None:
    """A client that opens a stream and goes silent does not hold a slot forever."""
    running = await start_codec(idle_timeout_s=0.5)
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            call = codec_pb2_grpc.CodecStub(ch).Encode(timeout=20)
            await call.write(codec_pb2.EncodeRequest(open=codec_pb2.CodecOpen()))
            assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "idle" in (await call.details())
        assert (await _codec_info(_conn(running.address))).slots_in_use == 0
    finally:
        await running.stop(0)


# ----------------------------------------------------------------------------- logs


@pytest.mark.slow
def test_no_secrets_in_logs(tmp_path: Path, free_port_factory) -> None:
    """Codec and gateway subprocesses at DEBUG level, tokens given by env vars (never on the
    command line, where `ps` shows them); calls with the right and with wrong tokens and a
    bad frame; neither token nor the wrong guesses appear in any log."""
    guess = "guess-" + TOKEN[::-1]
    client_token = "client-" + TOKEN
    codec = ServiceProcess(
        "codec",
        free_port_factory(),
        free_port_factory(),
        ["--model", "echo", "--max-sessions", "2"],
        tmp_path / "codec.log",
        env={"MOSHI_GRPC_AUTH_TOKEN": TOKEN},
        log_level="DEBUG",
    )
    gateway = None
    try:
        codec.wait_serving()
        # No LM replica listens on lm_port: sessions fail cleanly after auth.
        gateway = ServiceProcess(
            "gateway",
            free_port_factory(),
            free_port_factory(),
            ["--codec-addr", codec.address, "--lm-addr", f"127.0.0.1:{free_port_factory()}"],
            tmp_path / "gateway.log",
            env={
                "MOSHI_GRPC_AUTH_TOKEN": client_token,
                "MOSHI_GRPC_BACKEND_AUTH_TOKEN": TOKEN,
            },
            log_level="DEBUG",
        )
        gateway.wait_serving()

        async def calls() -> None:
            conn = _conn(codec.address)
            assert len(await _encode(conn, _bearer(TOKEN))) == 2
            await _expect_unauthenticated(_encode(conn, _bearer(guess)))
            await _expect_unauthenticated(_codec_info(conn, (("authorization", guess),)))
            bad = [
                codec_pb2.EncodeRequest(open=codec_pb2.CodecOpen()),
                codec_pb2.EncodeRequest(frame=codec_pb2.PcmFrame(index=0, pcm_f32le=b"123")),
            ]
            with pytest.raises(StreamFailed) as err:
                await conn.stream(codec_pb2_grpc.CodecStub, "Encode", bad, _bearer(TOKEN))
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            gw = _conn(gateway.address)
            await _expect_unauthenticated(_converse(gw, _bearer(guess)))
            with pytest.raises(StreamFailed) as err:
                await _converse(gw, _bearer(client_token))
            assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value
            assert TOKEN not in err.value.details and client_token not in err.value.details

        asyncio.run(calls())
    finally:
        for proc in (gateway, codec):
            if proc is not None:
                proc.signal(signal.SIGTERM)
                proc.stop()
    for proc in (codec, gateway):
        logs = proc.logs()
        # The capture worked: start-up lines and the refused/invalid calls were logged.
        assert len(logs.splitlines()) >= 5, logs
        for secret in (TOKEN, client_token, guess):
            assert secret not in logs, f"{proc.service} logged a secret"
    assert "INVALID_ARGUMENT" in codec.logs()
