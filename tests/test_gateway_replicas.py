"""Gateway routing: replica specs, DNS expansion, least-loaded choice, health, backend auth/TLS.

Replica choice is checked both on hand-made load figures (pure logic) and end to end with
real codec/LM replicas on loopback.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tls_certs import make_pki

from moshi_grpc.services.codec.engine import CodecOptions
from moshi_grpc.services.codec.startup import start_codec_server
from moshi_grpc.services.common.errors import ErrorCode
from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.services.gateway.admission import NoCapacity, choose
from moshi_grpc.services.gateway.cli import start_gateway
from moshi_grpc.services.gateway.config import GatewaySettings
from moshi_grpc.services.gateway.discovery import (
    ChannelSettings,
    ReplicaSet,
    ReplicaSpecError,
    Spec,
    parse_spec,
    parse_specs,
    resolve_addresses,
)
from moshi_grpc.services.gateway.moshi_pipeline import CODEC, LM
from moshi_grpc.services.gateway.replicas import Replica
from moshi_grpc.services.lm.engine import LmOptions
from moshi_grpc.services.lm.startup import start_lm_server
from moshi_grpc.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

# --------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("127.0.0.1:50052", Spec("127.0.0.1", 50052, False)),
        ("codec:50052", Spec("codec", 50052, False)),
        ("[::1]:9", Spec("::1", 9, False)),
        (
            "dns:///codec.default.svc.cluster.local:50052",
            Spec("codec.default.svc.cluster.local", 50052, True),
        ),
        ("dns:codec:1", Spec("codec", 1, True)),
        ("dns://8.8.8.8/codec:1", Spec("codec", 1, True)),
    ],
)
def test_parse_spec(text: str, spec: Spec) -> None:
    assert parse_spec(text) == spec


@pytest.mark.parametrize("text", ["codec", "codec:", ":80", "codec:http", "codec:70000", "[::1]9"])
def test_parse_spec_rejects_bad_addresses(text: str) -> None:
    with pytest.raises(ReplicaSpecError, match="bad replica address"):
        parse_spec(text)


def test_parse_specs_splits_commas_and_repeats() -> None:
    specs = parse_specs(["a:1,b:2", "dns:///c:3"])
    assert [s.target for s in specs] == ["a:1", "b:2", "c:3"]
    assert [s.dns for s in specs] == [False, False, True]
    assert parse_spec("[::1]:5").target == "[::1]:5"
    with pytest.raises(ReplicaSpecError):
        parse_specs(" , ")


async def test_resolve_addresses_uses_getaddrinfo() -> None:
    """Every address the system resolver gives, as ip:port (IPv6 bracketed), sorted; no
    assumption on what `localhost` maps to on this machine."""
    import socket

    assert await resolve_addresses("127.0.0.1", 1234) == ["127.0.0.1:1234"]
    if socket.has_ipv6:
        assert await resolve_addresses("::1", 1234) == ["[::1]:1234"]
    expected = set()
    for family, _, _, _, sockaddr in socket.getaddrinfo("localhost", 1234, type=socket.SOCK_STREAM):
        ip = sockaddr[0]
        expected.add(f"[{ip}]:1234" if family == socket.AF_INET6 else f"{ip}:1234")
    addresses = await resolve_addresses("localhost", 1234)
    assert addresses == sorted(expected) and addresses


# --------------------------------------------------------------------------- choice logic


def _replica(kind: str, address: str, total: int, used: int, p99: float = 1.0, **kw) -> Replica:
    channel = grpc.aio.insecure_channel(address)  # never used: no RPC is made
    info = common_pb2.BackendInfo(slots_total=total, slots_in_use=used, step_p99_ms=p99, **kw)
    return Replica({"lm": LM, "codec": CODEC}[kind], address, channel, healthy=True, info=info)


async def test_choose_least_loaded_then_fastest() -> None:
    rs = ReplicaSet(LM, [], ChannelSettings())
    for r in (
        _replica("lm", "a:1", 4, 3, p99=8.0),
        _replica("lm", "b:1", 8, 2, p99=30.0),
        _replica("lm", "c:1", 8, 2, p99=10.0),
        _replica("lm", "d:1", 2, 0, draining=True),
    ):
        rs.replicas[r.address] = r
    assert choose(rs, 100, lambda r: r.step_p99_ms).address == "c:1"
    # Sessions placed since the last poll count: c fills up, b becomes the least loaded.
    rs.replicas["c:1"].local_sessions = 3
    assert choose(rs, 100, lambda r: r.step_p99_ms).address == "b:1"
    # Budget: replicas whose recent step p99 does not fit are skipped, or refused if none fits.
    assert choose(rs, 20, lambda r: r.step_p99_ms).address in {"a:1", "c:1"}
    with pytest.raises(NoCapacity, match="cannot meet the 5 ms budget") as err:
        choose(rs, 5, lambda r: r.step_p99_ms)
    assert err.value.reason == "budget" and err.value.code == ErrorCode.NO_CAPACITY
    for r in rs.replicas.values():
        await r.channel.close()


async def test_choose_refuses_full_or_unhealthy_sets() -> None:
    rs = ReplicaSet(CODEC, [], ChannelSettings())
    full = _replica("codec", "a:1", 2, 2)
    rs.replicas["a:1"] = full
    with pytest.raises(NoCapacity, match="no codec replica has a free slot") as err:
        choose(rs, 100, lambda r: 0.0)
    assert err.value.reason == "capacity"
    full.healthy = False
    with pytest.raises(NoCapacity, match="no healthy codec replica") as err:
        choose(rs, 100, lambda r: 0.0)
    assert err.value.code == ErrorCode.UNAVAILABLE
    await full.channel.close()


# --------------------------------------------------------------------------- end to end


def _cfg(**kw) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=None, **kw)


async def _open_session(stub) -> tuple[grpc.aio.StreamStreamCall, gateway_pb2.SessionStarted]:
    call = stub.Converse()
    await call.write(
        gateway_pb2.ConverseRequest(
            config=gateway_pb2.SessionConfig(
                sample_rate=24000, encoding=gateway_pb2.AUDIO_ENCODING_FLOAT32
            )
        )
    )
    msg = await call.read()
    if msg is grpc.aio.EOF:
        raise AssertionError(f"no SessionStarted: {await call.code()} {await call.details()}")
    return call, msg.event.started


async def test_dns_name_expands_to_every_replica_and_sessions_spread() -> None:
    """A DNS spec resolving to two codec pods: both are used, least-loaded first, and a pod
    that disappears from DNS takes no new sessions."""
    codecs = [
        await start_codec_server(_cfg(), CodecOptions(model="echo", max_sessions=4))
        for _ in range(2)
    ]
    lm = await start_lm_server(_cfg(), LmOptions(model="echo", max_sessions=8))
    answer = [c.address for c in codecs]

    async def resolver(host: str, port: int) -> list[str]:
        assert (host, port) == ("codec.test", 50052)
        return list(answer)

    gateway = await start_gateway(
        _cfg(),
        "dns:///codec.test:50052",
        lm.address,
        GatewaySettings(refresh_interval_s=0.05),
        resolver=resolver,
    )
    calls = []
    try:
        assert set(gateway.pool.sets["codec"].replicas) == set(answer)
        stub = gateway_pb2_grpc.GatewayStub(grpc.aio.insecure_channel(gateway.address))
        placed = []
        for _ in range(4):
            call, started = await _open_session(stub)
            calls.append(call)
            placed.append(started.codec_replica)
            # Let the pool's Info view catch up with the sessions placed so far.
            for _ in range(250):
                seen = sum(
                    r.info.slots_in_use for r in gateway.pool.sets["codec"].replicas.values()
                )
                if seen == len(calls):
                    break
                await asyncio.sleep(0.02)
        assert sorted(placed) == sorted(answer * 2)  # 2 + 2: least-loaded alternates
        answer[:] = [codecs[0].address]  # pod 1 leaves DNS
        for _ in range(100):
            if not gateway.pool.sets["codec"].replicas[codecs[1].address].listed:
                break
            await asyncio.sleep(0.02)
        for _ in range(2):
            call, started = await _open_session(stub)
            calls.append(call)
            assert started.codec_replica == codecs[0].address
    finally:
        for call in calls:
            call.cancel()
        await gateway.stop(0)
        for s in (*codecs, lm):
            await s.stop(0)


async def test_backend_health_is_watched() -> None:
    codec = await start_codec_server(_cfg(), CodecOptions(model="echo", max_sessions=4))
    lm = await start_lm_server(_cfg(), LmOptions(model="echo", max_sessions=4))
    gateway = await start_gateway(
        _cfg(), codec.address, lm.address, GatewaySettings(refresh_interval_s=0.05)
    )
    try:
        replica = gateway.pool.sets["lm"].replicas[lm.address]
        assert replica.healthy and replica.info.slots_total == 4
        await lm.set_serving(False)  # e.g. reloading: NOT_SERVING
        for _ in range(100):
            if not replica.healthy:
                break
            await asyncio.sleep(0.02)
        assert not replica.healthy
        stub = gateway_pb2_grpc.GatewayStub(grpc.aio.insecure_channel(gateway.address))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _open_session(stub)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no healthy lm replica" in err.value.details()
    finally:
        await gateway.stop(0)
        await codec.stop(0)
        await lm.stop(0)


async def test_backend_auth_token_and_tls(tmp_path) -> None:
    """Backends with TLS and a bearer token: the gateway reaches them only with both."""
    pki = make_pki(tmp_path)
    secure = {
        "tls_cert": str(tmp_path / "server.crt"),
        "tls_key": str(tmp_path / "server.key"),
        "auth_token": "s3cret",
    }
    codec = await start_codec_server(_cfg(**secure), CodecOptions(model="echo", max_sessions=4))
    lm = await start_lm_server(_cfg(**secure), LmOptions(model="echo", max_sessions=4))
    good = ChannelSettings(tls_ca=pki.ca.cert_pem, auth_token="s3cret")
    bad = ChannelSettings(tls_ca=pki.ca.cert_pem, auth_token="wrong")
    gateways = []
    try:
        for channels in (good, bad):
            gateways.append(
                await start_gateway(
                    _cfg(),
                    codec.address,
                    lm.address,
                    GatewaySettings(refresh_interval_s=0.05),
                    channels,
                )
            )
        ok_stub = gateway_pb2_grpc.GatewayStub(grpc.aio.insecure_channel(gateways[0].address))
        call, started = await _open_session(ok_stub)
        assert started.lm_replica == lm.address
        call.cancel()
        bad_stub = gateway_pb2_grpc.GatewayStub(grpc.aio.insecure_channel(gateways[1].address))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _open_session(bad_stub)
        # Info is refused with UNAUTHENTICATED, so the replicas never count as healthy.
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        for g in gateways:
            await g.stop(0)
        await codec.stop(0)
        await lm.stop(0)


async def test_gateway_requires_its_own_token_when_configured() -> None:
    """The gateway gets the common server hygiene: bearer-token auth on Converse."""
    codec = await start_codec_server(_cfg(), CodecOptions(model="echo", max_sessions=2))
    lm = await start_lm_server(_cfg(), LmOptions(model="echo", max_sessions=2))
    gateway = await start_gateway(_cfg(auth_token="gw-token"), codec.address, lm.address)
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _open_session(stub)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            call = stub.Converse(metadata=(("authorization", "Bearer gw-token"),))
            await call.write(
                gateway_pb2.ConverseRequest(
                    config=gateway_pb2.SessionConfig(
                        sample_rate=24000, encoding=gateway_pb2.AUDIO_ENCODING_PCM16
                    )
                )
            )
            assert (await call.read()).event.HasField("started")
            call.cancel()
    finally:
        await gateway.stop(0)
        await codec.stop(0)
        await lm.stop(0)
