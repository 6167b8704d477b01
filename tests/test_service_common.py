"""The shared serving layer: real grpc.aio servers on loopback (the echo codec as the vehicle),
real HTTP /metrics scrapes, and the batching scheduler with a recording model."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from moshi_grpc.services.codec.echo import EchoMimi
from moshi_grpc.services.codec.engine import CodecOptions
from moshi_grpc.services.codec.startup import start_codec_server
from moshi_grpc.services.common import errors, flags, status
from moshi_grpc.services.common.batching import BatchScheduler
from moshi_grpc.services.common.metrics import (
    METRIC_NAMES,
    CodecMetrics,
    GatewayMetrics,
    LmMetrics,
    RpcMetrics,
    ServerMetrics,
    new_registry,
)
from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.v1 import codec_pb2, codec_pb2_grpc, common_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FRAME = 1920


def pcm(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return (rng.uniform(-0.9, 0.9, FRAME)).astype("<f4").tobytes()


def open_req(session: str = "t") -> codec_pb2.EncodeRequest:
    return codec_pb2.EncodeRequest(open=codec_pb2.CodecOpen(session_id=session))


def frame_req(i: int, data: bytes | None = None) -> codec_pb2.EncodeRequest:
    return codec_pb2.EncodeRequest(
        frame=codec_pb2.PcmFrame(index=i, pcm_f32le=pcm(i) if data is None else data)
    )


async def start_echo(**config) -> object:
    options = CodecOptions(model="echo", max_sessions=config.pop("max_sessions", 4))
    return await start_codec_server(ServerConfig(**config), options)


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


def scrape(url: str) -> dict[str, float]:
    """{'name{label=value,...}': value} for every sample of the exposition."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def key(name: str, **labels: str) -> str:
    """The `scrape` key of a sample."""
    return name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


async def expect_status(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == code, info.value.details()
    return info.value.details()


# -- server lifecycle --------------------------------------------------------------------------


async def test_not_serving_while_loading_then_serving() -> None:
    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return EchoMimi()

    running = await start_codec_server(
        ServerConfig(), CodecOptions(model="echo"), load_model=slow_load, wait_ready=False
    )
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            assert await health_status(ch) == NOT_SERVING
            assert await health_status(ch, "moshi_grpc.v1.Codec") == NOT_SERVING
            stub = codec_pb2_grpc.CodecStub(ch)
            details = await expect_status(
                stub.Encode(iter([open_req()])), grpc.StatusCode.UNAVAILABLE
            )
            assert "loading" in details
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Info(common_pb2.InfoRequest())
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            gate.set()
            await running.ready
            assert await health_status(ch) == SERVING
            assert await health_status(ch, "moshi_grpc.v1.Codec") == SERVING
            info = await stub.Info(common_pb2.InfoRequest())
            assert info.model_name == "mimi-echo" and not info.draining
    finally:
        gate.set()
        await running.stop(0)


async def test_model_load_failure_stops_the_server() -> None:
    def broken():
        raise ValueError("weights file is corrupt")

    running = await start_codec_server(
        ServerConfig(), CodecOptions(model="echo"), load_model=broken, wait_ready=False
    )
    with pytest.raises(ValueError, match="corrupt"):
        await running.ready
    await asyncio.wait_for(running.wait_closed(), 10)
    assert running.servicer.engine is None


async def test_drain_refuses_new_streams_and_lets_live_ones_finish() -> None:
    running = await start_echo(grace_s=20)
    async with grpc.aio.insecure_channel(running.address) as ch:
        stub = codec_pb2_grpc.CodecStub(ch)
        live = stub.Encode()
        await live.write(open_req("live"))
        await live.write(frame_req(0))
        assert (await live.read()).index == 0
        drain = asyncio.ensure_future(running.drain())
        for _ in range(100):
            if await health_status(ch) == NOT_SERVING:
                break
            await asyncio.sleep(0.02)
        assert await health_status(ch) == NOT_SERVING
        assert (await stub.Info(common_pb2.InfoRequest())).draining
        details = await expect_status(
            stub.Encode(iter([open_req("new")])), grpc.StatusCode.UNAVAILABLE
        )
        assert "draining" in details
        # the live stream keeps working during the drain
        for i in range(1, 3):
            await live.write(frame_req(i))
            assert (await live.read()).index == i
        assert not drain.done()
        await live.done_writing()
        assert await live.code() == grpc.StatusCode.OK
        await asyncio.wait_for(drain, 20)
    assert running.servicer.engine.encoder.slots_in_use == 0


async def test_drain_grace_over_cancels_stream_and_frees_slot() -> None:
    running = await start_echo(grace_s=0.3)
    async with grpc.aio.insecure_channel(running.address) as ch:
        stub = codec_pb2_grpc.CodecStub(ch)
        live = stub.Encode()
        await live.write(open_req("stuck"))
        await live.write(frame_req(0))
        await live.read()
        await asyncio.wait_for(running.drain(), 20)
        assert await live.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    engine = running.servicer.engine
    assert engine.encoder.slots_in_use == 0


async def test_auth_token_required_except_health() -> None:
    running = await start_echo(auth_token="s3cret")
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            assert await health_status(ch) == SERVING  # probes need no token
            stub = codec_pb2_grpc.CodecStub(ch)
            messages = []
            for md in (None, (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Info(common_pb2.InfoRequest(), metadata=md)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                messages.append(info.value.details())
            assert len(set(messages)) == 1  # never says which part failed
            call = stub.Encode(iter([open_req()]), metadata=None)
            await expect_status(call, grpc.StatusCode.UNAUTHENTICATED)
            good = (("authorization", "Bearer s3cret"),)
            assert (await stub.Info(common_pb2.InfoRequest(), metadata=good)).slots_total == 4
            outs = [o async for o in stub.Encode(iter([open_req(), frame_req(0)]), metadata=good)]
            assert len(outs) == 1
    finally:
        await running.stop(0)


async def test_reflection_lists_services() -> None:
    running = await start_echo()
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            req = reflection_pb2.ServerReflectionRequest(list_services="")
            names = set()
            async for resp in stub.ServerReflectionInfo(iter([req])):
                names |= {s.name for s in resp.list_services_response.service}
            assert {"moshi_grpc.v1.Codec", "grpc.health.v1.Health"} <= names
    finally:
        await running.stop(0)


async def test_oversized_message_and_idle_timeout_leave_others_working() -> None:
    """An oversized message ends only its own stream (RESOURCE_EXHAUSTED), an idle stream
    only itself (DEADLINE_EXCEEDED); a stream opened beside the idle one is answered frame
    for frame and ends OK, and the server serves new streams after both. Nothing races the
    idle timeout: the good stream's requests are all handed to gRPC at once (no gap for the
    timeout to see), and each outcome is awaited, whichever comes first."""
    running = await start_echo(max_message_bytes=16 * 1024, idle_timeout_s=0.5)
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            big = stub.Encode(iter([open_req("big"), frame_req(0, b"\0" * 20000)]))
            details = await expect_status(big, grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "larger than max" in details.lower() or "message" in details.lower()
            idle = stub.Encode()
            await idle.write(open_req("idle"))
            idle_done = asyncio.ensure_future(
                expect_status(idle, grpc.StatusCode.DEADLINE_EXCEEDED)
            )
            good = stub.Encode(iter([open_req("good"), *(frame_req(i) for i in range(5))]))
            assert [o.index async for o in good] == list(range(5))
            assert await good.code() == grpc.StatusCode.OK
            assert "idle" in await idle_done
            after = stub.Encode(iter([open_req("after"), frame_req(0)]))
            assert [o.index async for o in after] == [0]
            assert await after.code() == grpc.StatusCode.OK
    finally:
        await running.stop(0)


async def test_metrics_scraped_over_http_match_what_happened() -> None:
    running = await start_echo(max_sessions=1)
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            holder = stub.Encode()
            await holder.write(open_req("a"))
            for i in range(5):
                await holder.write(frame_req(i))
                await holder.read()
            refused = await expect_status(
                stub.Encode(iter([open_req("b")])), grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            assert "slots are in use" in refused
            await holder.done_writing()
            assert await holder.code() == grpc.StatusCode.OK
            await expect_status(
                stub.Encode(iter([frame_req(0)])), grpc.StatusCode.FAILED_PRECONDITION
            )
            await stub.Info(common_pb2.InfoRequest())
        m = scrape(running.metrics_url)
    finally:
        await running.stop(0)
    enc = {
        "grpc_service": "moshi_grpc.v1.Codec",
        "grpc_method": "Encode",
        "grpc_type": "bidi_stream",
    }
    assert m[key("grpc_server_started_total", **enc)] == 3
    assert m[key("grpc_server_handled_total", grpc_code="OK", **enc)] == 1
    assert m[key("grpc_server_handled_total", grpc_code="RESOURCE_EXHAUSTED", **enc)] == 1
    assert m[key("grpc_server_handled_total", grpc_code="FAILED_PRECONDITION", **enc)] == 1
    assert m[key("grpc_server_handling_seconds_count", **enc)] == 3
    info = {"grpc_service": "moshi_grpc.v1.Codec", "grpc_method": "Info", "grpc_type": "unary"}
    assert m[key("grpc_server_handled_total", grpc_code="OK", **info)] == 1
    assert m["moshi_codec_frames_total{stage=encode}"] == 5
    assert m["moshi_codec_batch_size_count{stage=encode}"] == 5
    assert m["moshi_codec_streams_started_total{stage=encode}"] == 1
    assert m["moshi_codec_streams_refused_total{reason=capacity,stage=encode}"] == 1
    assert m["moshi_codec_streams_active{stage=encode}"] == 0
    assert m["moshi_codec_slots{stage=encode}"] == 1
    assert m["moshi_codec_frame_seconds_count{stage=encode}"] == 5
    assert m["moshi_server_ready{service=codec}"] == 1
    assert m["moshi_server_draining{service=codec}"] == 0
    assert any(k.startswith("moshi_build_info{") and "model=mimi-echo" in k for k in m)
    assert not any("session" in k for k in m)  # no per-session labels


def test_metric_table_lists_every_metric_and_names_follow_conventions() -> None:
    registry = new_registry()
    RpcMetrics.create(registry)
    ServerMetrics.create(registry, "x")
    CodecMetrics.create(registry)
    from moshi_grpc.services.lm.prefix_cache import CacheStats

    LmMetrics.create(registry).watch_prefix_cache(CacheStats)  # (a persona LM's cache)
    GatewayMetrics.create(registry)
    defined = set()
    for family in registry.collect():
        name = family.name
        if family.type == "counter":
            name += "_total"
            assert name.endswith("_total")
        if family.type == "histogram":  # a base unit, or a unitless count / ratio
            assert name.endswith(("_seconds", "_ratio", "_batch_size", "_rows")), name
        defined.add(name)
    assert defined == set(METRIC_NAMES)
    for name in defined:
        assert name.startswith(("moshi_", "grpc_server_")), name
    # budget values are bucket edges of the per-frame latency histograms
    from moshi_grpc.services.common.metrics import LATENCY_BUCKETS

    assert {0.08, 0.1, 0.2} <= set(LATENCY_BUCKETS)


def test_domain_errors_map_to_status_codes() -> None:
    S = grpc.StatusCode
    cases = [
        (errors.InvalidInput("bad"), S.INVALID_ARGUMENT),
        (ValueError("plain"), S.INVALID_ARGUMENT),
        (errors.OutOfOrder("late"), S.FAILED_PRECONDITION),
        (errors.CapacityExhausted("full"), S.RESOURCE_EXHAUSTED),
        (errors.Draining("bye"), S.UNAVAILABLE),
        (errors.NotReady("wait"), S.UNAVAILABLE),
        (errors.BackendUnavailable("down"), S.UNAVAILABLE),
        (errors.IdleTimeout("idle"), S.DEADLINE_EXCEEDED),
        (errors.BudgetExceeded("slow"), S.DEADLINE_EXCEEDED),
        (errors.Unauthenticated("who"), S.UNAUTHENTICATED),
        (errors.NotImplementedFeature("no"), S.UNIMPLEMENTED),
        (errors.NotFound("no such voice"), S.NOT_FOUND),
        (errors.WrongModel("no persona here"), S.FAILED_PRECONDITION),
        (RuntimeError("secret detail"), S.INTERNAL),
    ]
    for exc, code in cases:
        got, message = status.status_for(exc)
        assert got == code, exc
        assert message
    assert "secret" not in status.status_for(RuntimeError("secret detail"))[1]
    # Every domain code has its status (an enum member added later cannot go unmapped).
    assert set(status.GRPC_STATUS) == set(errors.ErrorCode)


def test_flags_build_server_config(monkeypatch) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    flags.add_server_flags(parser, "codec")
    flags.add_batching_flags(parser)
    flags.add_model_flags(parser, "codec")
    monkeypatch.setenv("MOSHI_GRPC_AUTH_TOKEN", "from-env")
    args = parser.parse_args(
        ["--port", "0", "--metrics-port", "-1", "--max-connection-age-s", "60"]
    )
    config = flags.server_config_from_args(args)
    assert config.port == 0 and config.metrics_port is None
    assert config.auth_token == "from-env"
    options = dict(config.grpc_options())
    assert options["grpc.max_connection_age_ms"] == 60000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] > 0
    args = parser.parse_args(["--mimi-weights", "/nonexistent/mimi.safetensors"])
    with pytest.raises(flags.WeightsError, match="not found"):
        flags.resolve_weights(args, "codec")


# -- the batching scheduler --------------------------------------------------------------------


class RecordingRunner:
    """A model that records each batched call; result = payload * 10 + slot."""

    def __init__(self, num_slots: int, fail_on: int | None = None) -> None:
        self.num_slots = num_slots
        self.calls: list[list[int]] = []
        self.joins: list[tuple[int, object]] = []
        self.fail_on = fail_on
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()  # set when a model call starts

    def join(self, slot, payload) -> None:
        self.joins.append((slot, payload))

    @property
    def ladder(self) -> tuple[int, ...]:
        return tuple(range(1, self.num_slots + 1))

    def leave(self, slot) -> None:
        pass

    def warm_up(self, bucket) -> float:
        return 0.001  # the step's own seconds, as a runner measures them

    def run(self, slots, payloads):
        self.entered.set()
        self.release.wait(10)
        self.calls.append(list(slots))
        if self.fail_on is not None and self.fail_on in payloads:
            raise RuntimeError("model exploded")
        return [p * 10 + s for s, p in zip(slots, payloads)], len(slots)


async def test_scheduler_batches_concurrent_frames_in_one_call() -> None:
    runner = RecordingRunner(4)
    sched = BatchScheduler(runner, name="t", max_wait_s=5.0)
    sched.start()
    try:
        handles = [sched.acquire(open_payload=f"open{i}") for i in range(3)]
        results = await asyncio.gather(*(h.submit(i + 1) for i, h in enumerate(handles)))
        assert [r for r, _ in results] == [10, 21, 32]
        assert runner.calls == [[0, 1, 2]]  # all present: no waiting for max_wait
        assert sorted(runner.joins) == [(0, "open0"), (1, "open1"), (2, "open2")]
        assert all(t.batch_size == 3 for _, t in results)
        # a slot that does not send does not block the others beyond max_wait
        sched.max_wait_s = 0.01
        r, t = await asyncio.wait_for(handles[0].submit(7), 5)
        assert r == 70 and t.batch_size == 1
    finally:
        sched.close()


async def test_scheduler_capacity_release_and_failures() -> None:
    runner = RecordingRunner(2, fail_on=99)
    sched = BatchScheduler(runner, name="codec-encode", max_wait_s=0.0)
    sched.start()
    try:
        a, b = sched.acquire(), sched.acquire()
        with pytest.raises(errors.CapacityExhausted, match="all 2 codec-encode slots"):
            sched.acquire()
        # a frame queued behind a busy model is dropped when its stream leaves
        runner.release.clear()
        runner.entered.clear()
        first = asyncio.ensure_future(a.submit(1))
        # Explicit events, no sleeps: the model call with a's frame has started (and waits
        # for `release`), then b's frame is queued (submit_nowait queues synchronously).
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, runner.entered.wait, 10)
        queued = b.submit_nowait(2)
        b.release()
        b.release()  # idempotent
        runner.release.set()
        assert (await first)[0] == 10
        with pytest.raises(asyncio.CancelledError):
            await queued
        c = sched.acquire(open_payload="again")
        assert c.slot == 1 and sched.slots_in_use == 2
        # a failing model call fails only that call's frames; the scheduler keeps going
        with pytest.raises(RuntimeError, match="exploded"):
            await c.submit(99)
        assert (await c.submit(3))[0] == 31
        assert [call for call in runner.calls if 1 in call][-1] == [1]
        assert runner.joins[-1] == (1, "again")
    finally:
        sched.close()
    with pytest.raises(errors.Draining):
        sched.acquire()


async def test_scheduler_survives_streams_leaving_while_it_waits() -> None:
    runner = RecordingRunner(2)
    sched = BatchScheduler(runner, name="t", max_wait_s=5.0)  # would wait long for b
    sched.start()
    try:
        a, b = sched.acquire(), sched.acquire()
        waiting = a.submit_nowait(1)  # queued now: the runner waits (up to 5 s) for b
        a.release()  # the only queued frame goes away while the runner waits for b
        with pytest.raises(asyncio.CancelledError):
            await waiting
        result, timing = await asyncio.wait_for(b.submit(2), 10)
        assert result == 21 and timing.batch_size == 1
        assert runner.calls == [[1]]  # never an empty or stale batch
    finally:
        sched.close()


# -- the CLI process ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("service", ["codec", "lm"])
def test_cli_process_serves_and_drains_on_sigterm(repo_root, service) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moshi_grpc.cli", service, "--model", "echo", "--port", "0"]
        + ["--metrics-port", "0", "--grace", "5"],
        cwd=repo_root,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        address = None
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline and address is None:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if f"{service} listening on" in line:
                address = line.rsplit(" ", 1)[-1].strip()
        assert address, "".join(lines)

        async def check() -> int:
            async with grpc.aio.insecure_channel(address) as ch:
                for _ in range(200):
                    if await health_status(ch) == SERVING:
                        break
                    await asyncio.sleep(0.05)
                return await health_status(ch)

        assert asyncio.run(check()) == SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        rest = proc.stderr.read()
        assert "draining" in rest and "stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- TLS and mTLS ------------------------------------------------------------------------------


def _pki(tmp_path):
    """A throw-away CA with a server certificate (127.0.0.1) and a client certificate."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject, key, issuer, issuer_key, ca: bool, san=None):
        b = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san is not None:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def pem_key(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key, srv_key, cli_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = cert("test-ca", ca_key, "test-ca", ca_key, True)
    srv = cert(
        "server",
        srv_key,
        "test-ca",
        ca_key,
        False,
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    cli = cert("client", cli_key, "test-ca", ca_key, False)
    files = {}
    for label, data in {
        "ca.pem": ca.public_bytes(serialization.Encoding.PEM),
        "server.pem": srv.public_bytes(serialization.Encoding.PEM),
        "server.key": pem_key(srv_key),
        "client.pem": cli.public_bytes(serialization.Encoding.PEM),
        "client.key": pem_key(cli_key),
    }.items():
        (tmp_path / label).write_bytes(data)
        files[label] = data
    return files


async def test_tls_and_mutual_tls(tmp_path) -> None:
    pki = _pki(tmp_path)
    running = await start_echo(
        tls_cert=str(tmp_path / "server.pem"),
        tls_key=str(tmp_path / "server.key"),
        tls_client_ca=str(tmp_path / "ca.pem"),
    )
    try:
        assert running.tls
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=pki["ca.pem"],
            private_key=pki["client.key"],
            certificate_chain=pki["client.pem"],
        )
        async with grpc.aio.secure_channel(running.address, with_cert) as ch:
            info = await codec_pb2_grpc.CodecStub(ch).Info(common_pb2.InfoRequest(), timeout=10)
            assert info.slots_total == 4
        no_cert = grpc.ssl_channel_credentials(root_certificates=pki["ca.pem"])
        async with grpc.aio.secure_channel(running.address, no_cert) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await codec_pb2_grpc.CodecStub(ch).Info(common_pb2.InfoRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(running.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as plain:
                await codec_pb2_grpc.CodecStub(ch).Info(common_pb2.InfoRequest(), timeout=10)
            assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(0)


def test_tls_needs_both_cert_and_key(tmp_path) -> None:
    from moshi_grpc.services.common.server import _credentials

    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        _credentials(ServerConfig(tls_cert=str(tmp_path / "x.pem")))
    with pytest.raises(ValueError, match="not found"):
        _credentials(ServerConfig(tls_cert=str(tmp_path / "x.pem"), tls_key=str(tmp_path / "k")))


def test_hf_repo_without_network_fails_with_a_clear_message(repo_root, tmp_path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "moshi_grpc.cli", "codec", "--hf-repo", "kyutai/none"]
        + ["--port", "0", "--metrics-port", "-1"],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "could not download" in proc.stderr and "--mimi-weights" in proc.stderr


# -- idle probes: warm figures heal without traffic ----------------------------------------------


class ProbedRunner(RecordingRunner):
    """Counts warm-up steps; each measures `step_s` (a busy neighbour: set it high). The
    figure is what the runner reports, not a sleep: the test decides the timings."""

    def __init__(self, num_slots: int, step_s: float = 0.001) -> None:
        super().__init__(num_slots)
        self.step_s = step_s
        self.warm_ups: list[int] = []

    def warm_up(self, bucket) -> float:
        self.warm_ups.append(bucket)
        return self.step_s


async def _until(predicate, what: str) -> None:
    for _ in range(2000):  # hang detector, not a timing assertion
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def test_idle_probes_heal_a_warm_up_timed_on_a_busy_machine() -> None:
    runner = ProbedRunner(4, step_s=0.06)  # a neighbour loads its model during our warm-up
    sched = BatchScheduler(runner, name="t", max_wait_s=0.0, idle_probe_s=0.01)
    busy = sched.warm_up(repeats=1)
    assert all(ms >= 60 for ms in busy.values())
    runner.step_s = 0.001  # the neighbour is done
    sched.start()
    try:
        await _until(lambda: all(sched.warm_ms[b] < 60 for b in runner.ladder), "re-timed")
        assert sched.idle_probes >= len(runner.ladder)
        assert sched.calls == 0 and runner.calls == []  # a probe is not a tick
        assert all(count == 0 for _, _, _, count in sched.bucket_timings())
        # a probe keeps the faster figure: a slow probe never raises it again
        healed = dict(sched.warm_ms)
        runner.step_s = 0.08
        probes = sched.idle_probes
        await _until(lambda: sched.idle_probes >= probes + len(runner.ladder), "slow probes")
        assert sched.warm_ms == healed
    finally:
        sched.close()


async def test_idle_probes_wait_while_any_scheduler_of_the_process_serves() -> None:
    runner, sibling_runner = ProbedRunner(2), ProbedRunner(2)
    sched = BatchScheduler(runner, name="encode", max_wait_s=0.0, idle_probe_s=0.005)
    sibling = BatchScheduler(sibling_runner, name="decode", max_wait_s=0.0, idle_probe_s=0.005)
    # The stream joins before the runner threads start: no probe can run before it (on a
    # busy machine one could, after 5 ms, and the next one in turn would be bucket 2).
    handle = sched.acquire()  # a stream on one scheduler: no probe on either
    sched.start()
    sibling.start()
    try:
        assert (await handle.submit(1))[0] == 10
        runner.warm_ups.clear()
        sibling_runner.warm_ups.clear()
        await asyncio.sleep(0.2)  # ~40 probe intervals; with a slot held, none may run
        assert runner.warm_ups == [] and sibling_runner.warm_ups == []
        handle.release()
        await _until(lambda: runner.warm_ups and sibling_runner.warm_ups, "probes resume")
        assert runner.warm_ups[0] == 1  # smallest bucket first: an idle replica's next join
    finally:
        sched.close()
        sibling.close()


def test_idle_probe_interval_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="idle probe interval must be >= 0"):
        BatchScheduler(RecordingRunner(1), name="t", idle_probe_s=-1.0)


def test_warm_figures_never_grow_with_a_smaller_bucket() -> None:
    """A smaller bucket could always be stepped as a larger one: its warm figure is capped."""
    sched = BatchScheduler(RecordingRunner(4), name="t", idle_probe_s=0.0)
    sched.warm_ms.update({1: 9.0, 2: 3.0, 3: 5.0, 4: 4.0})
    assert [(b, w) for b, w, _, _ in sched.bucket_timings()] == [
        (1, 3.0), (2, 3.0), (3, 4.0), (4, 4.0)
    ]  # fmt: skip
