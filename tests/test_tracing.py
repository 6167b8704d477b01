"""OpenTelemetry tracing on real loopback servers: one conversation is one connected trace
across gateway, codec and LM, in both backend stream modes; a multiplexed stream carries
each session's own context; with tracing off nothing of opentelemetry is even imported.

Spans go to the SDK's in-memory exporter through a synchronous processor (no network)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from conftest import REPO_ROOT

from moshi_grpc.services.codec.engine import CodecOptions
from moshi_grpc.services.codec.startup import start_codec_server
from moshi_grpc.services.common import tracing
from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.services.gateway.cli import start_gateway
from moshi_grpc.services.gateway.config import GatewaySettings
from moshi_grpc.services.lm.engine import LmOptions
from moshi_grpc.services.lm.startup import start_lm_server
from moshi_grpc.v1 import gateway_pb2, gateway_pb2_grpc

FRAMES = 6
BACKEND_SPANS = ("codec.encode", "codec.decode", "lm.step")
GATEWAY_STREAMS = ("gateway.encode", "gateway.decode", "gateway.step")
# A client's own trace: the gateway's session span joins it.
CLIENT_TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CLIENT_SPAN_ID = 0xB7AD6B7169203331
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE_ID:032x}-{CLIENT_SPAN_ID:016x}-01"


@dataclass
class Outcome:
    session_id: str
    code: grpc.StatusCode
    frames: int


async def _converse(stub, metadata: tuple = ()) -> Outcome:
    """One FLOAT32 session of FRAMES frames, sent then half-closed, read to its end."""
    call = stub.Converse(metadata=metadata)
    config = gateway_pb2.SessionConfig(
        sample_rate=24000, encoding=gateway_pb2.AUDIO_ENCODING_FLOAT32, budget_ms=5000
    )
    await call.write(gateway_pb2.ConverseRequest(config=config))
    pcm = np.linspace(-0.5, 0.5, 1920 * FRAMES, dtype="<f4")
    for t in range(FRAMES):
        chunk = pcm[t * 1920 : (t + 1) * 1920].tobytes()
        await call.write(gateway_pb2.ConverseRequest(audio=gateway_pb2.AudioChunk(data=chunk)))
    await call.done_writing()
    session_id, frames = "", 0
    async for message in call:
        if message.WhichOneof("kind") == "audio":
            frames += 1
        elif message.event.HasField("started"):
            session_id = message.event.started.session_id
    return Outcome(session_id, await call.code(), frames)


async def run_sessions(mode: str, sessions: int = 1, metadata: tuple = ()) -> list[Outcome]:
    """Echo codec + echo LM + gateway on loopback; `sessions` concurrent conversations."""
    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=None)
    codec = await start_codec_server(cfg, CodecOptions(model="echo", max_sessions=4))
    lm = await start_lm_server(cfg, LmOptions(model="echo", config="small", max_sessions=4))
    settings = GatewaySettings(refresh_interval_s=0.1, backend_streams=mode)
    gateway = await start_gateway(cfg, codec.address, lm.address, settings)
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            return list(await asyncio.gather(*(_converse(stub, metadata) for _ in range(sessions))))
    finally:
        await gateway.stop(0)
        await codec.stop(0)
        await lm.stop(0)


@pytest.fixture
def exporter():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    out = InMemorySpanExporter()
    tracing.install_exporter(out)
    yield out
    tracing.shutdown()


def _by_trace(spans) -> dict[int, dict[str, list]]:
    traces: dict[int, dict[str, list]] = {}
    for span in spans:
        traces.setdefault(span.context.trace_id, {}).setdefault(span.name, []).append(span)
    return traces


def _check_trace(named: dict[str, list], mode: str, session_id: str) -> None:
    """The seven spans of one session, each once, linked session -> stream -> backend."""
    assert sorted(named) == sorted(("gateway.session", *GATEWAY_STREAMS, *BACKEND_SPANS))
    assert all(len(spans) == 1 for spans in named.values()), named
    session = named["gateway.session"][0]
    assert session.resource.attributes["service.name"] == "gateway"
    attrs = session.attributes
    assert attrs["moshi.session_id"] == session_id
    assert attrs["moshi.encoding"] == "float32"
    assert attrs["moshi.outcome"] == "client_closed"
    assert attrs["rpc.grpc.status_code"] == 0
    assert attrs["moshi.frames_in"] == FRAMES
    for stream_name, backend_name in zip(GATEWAY_STREAMS, BACKEND_SPANS):
        stream = named[stream_name][0]
        backend = named[backend_name][0]
        assert stream.parent.span_id == session.context.span_id
        assert stream.attributes["moshi.backend_streams"] == mode
        assert backend.parent.span_id == stream.context.span_id
        assert backend.parent.is_remote
        assert backend.resource.attributes["service.name"] == backend_name.split(".")[0]
        assert backend.attributes["moshi.session_id"] == session_id
        assert backend.attributes["moshi.mux"] is (mode == "mux")


async def _wait_for_spans(exporter, count: int) -> list:
    """Backends end their session spans when the slot is freed, which may come just after
    the client saw its status: wait for that condition (bounded: a hang detector)."""
    for _ in range(1000):
        spans = exporter.get_finished_spans()
        if len(spans) >= count:
            return list(spans)
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(exporter.get_finished_spans())} spans finished, not {count}")


@pytest.mark.parametrize("mode", ["mux", "per-session"])
async def test_one_session_is_one_connected_trace(exporter, mode: str) -> None:
    (outcome,) = await run_sessions(mode)
    assert outcome.code == grpc.StatusCode.OK and outcome.frames == FRAMES
    spans = await _wait_for_spans(exporter, 7)
    traces = _by_trace(spans)
    assert len(traces) == 1, {hex(t): sorted(n) for t, n in traces.items()}
    (named,) = traces.values()
    _check_trace(named, mode, outcome.session_id)
    assert named["gateway.session"][0].parent is None  # the client sent no trace context


async def test_sessions_sharing_a_mux_stream_keep_their_own_traces(exporter) -> None:
    """Two concurrent sessions on the same EncodeMux/StepMux/DecodeMux streams: each
    backend session span is in its own session's trace (the context rides on the open
    entry, not on the shared stream)."""
    outcomes = await run_sessions("mux", sessions=2)
    assert [o.code for o in outcomes] == [grpc.StatusCode.OK] * 2
    traces = _by_trace(await _wait_for_spans(exporter, 14))
    assert len(traces) == 2
    by_session = {
        n["gateway.session"][0].attributes["moshi.session_id"]: n for n in traces.values()
    }
    assert sorted(by_session) == sorted(o.session_id for o in outcomes)
    for session_id, named in by_session.items():
        _check_trace(named, "mux", session_id)


async def test_gateway_session_joins_the_clients_trace(exporter) -> None:
    (outcome,) = await run_sessions("mux", metadata=(("traceparent", CLIENT_TRACEPARENT),))
    assert outcome.code == grpc.StatusCode.OK
    traces = _by_trace(await _wait_for_spans(exporter, 7))
    assert list(traces) == [CLIENT_TRACE_ID]
    session = traces[CLIENT_TRACE_ID]["gateway.session"][0]
    assert session.parent.span_id == CLIENT_SPAN_ID and session.parent.is_remote


async def test_lm_failover_adds_a_step_span_in_the_same_trace(exporter) -> None:
    """The LM replica dies mid-session: the session moves (replay) and its trace gets a
    second `gateway.step` and `lm.step`, the new ones on the other replica."""
    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=None)
    codec = await start_codec_server(cfg, CodecOptions(model="echo", max_sessions=4))
    lms = [
        await start_lm_server(cfg, LmOptions(model="echo", config="small", max_sessions=4))
        for _ in range(2)
    ]
    settings = GatewaySettings(refresh_interval_s=0.1)
    gateway = await start_gateway(cfg, codec.address, [lm.address for lm in lms], settings)
    float32 = gateway_pb2.AUDIO_ENCODING_FLOAT32
    frame = np.zeros(1920, "<f4").tobytes()
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            call = gateway_pb2_grpc.GatewayStub(channel).Converse()
            config = gateway_pb2.SessionConfig(sample_rate=24000, encoding=float32, budget_ms=5000)
            await call.write(gateway_pb2.ConverseRequest(config=config))
            audio_chunk = gateway_pb2.ConverseRequest(audio=gateway_pb2.AudioChunk(data=frame))
            for _ in range(3):
                await call.write(audio_chunk)
            answered = 0
            while answered < 3:  # the first frames went through the first LM
                message = await call.read()
                answered += message.WhichOneof("kind") == "audio"
            (session,) = gateway.servicer.sessions.values()
            first_lm = session.lease.replicas["lm"].address
            await next(lm for lm in lms if lm.address == first_lm).stop(0)
            for _ in range(3):
                await call.write(audio_chunk)
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
            assert await call.code() == grpc.StatusCode.OK
    finally:
        await gateway.stop(0)
        await codec.stop(0)
        for lm in lms:
            await lm.stop(0)
    (named,) = _by_trace(await _wait_for_spans(exporter, 9)).values()
    assert named["gateway.session"][0].attributes["moshi.failovers"] == 1
    steps = sorted(named["gateway.step"], key=lambda span: span.start_time)
    second_lm = next(lm.address for lm in lms if lm.address != first_lm)
    assert [span.attributes["moshi.replica"] for span in steps] == [first_lm, second_lm]
    by_parent = {span.parent.span_id: span for span in named["lm.step"]}
    assert sorted(by_parent) == sorted(span.context.span_id for span in steps)
    assert "moshi.replay_steps" not in by_parent[steps[0].context.span_id].attributes
    assert by_parent[steps[1].context.span_id].attributes["moshi.replay_steps"] >= 3


async def _refused(stub, config: gateway_pb2.SessionConfig) -> grpc.StatusCode:
    call = stub.Converse()
    await call.write(gateway_pb2.ConverseRequest(config=config))
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    return err.value.code()


async def test_a_refused_session_is_one_span_with_its_status(exporter) -> None:
    """Refusals end the session span with the status the client got: a bad config
    (INVALID_ARGUMENT, raised) and a budget no replica can meet (RESOURCE_EXHAUSTED, by
    `context.abort`). No backend stream was opened, so no other span exists."""
    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=None)
    codec = await start_codec_server(cfg, CodecOptions(model="echo", max_sessions=4))
    lm = await start_lm_server(cfg, LmOptions(model="echo", config="small", max_sessions=4))
    gateway = await start_gateway(cfg, codec.address, lm.address, GatewaySettings())
    float32 = gateway_pb2.AUDIO_ENCODING_FLOAT32
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            bad = gateway_pb2.SessionConfig(sample_rate=1, encoding=float32)
            assert await _refused(stub, bad) == grpc.StatusCode.INVALID_ARGUMENT
            tight = gateway_pb2.SessionConfig(sample_rate=24000, encoding=float32, budget_ms=1)
            assert await _refused(stub, tight) == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await gateway.stop(0)
        await codec.stop(0)
        await lm.stop(0)
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["gateway.session"] * 2
    assert [s.attributes["rpc.grpc.status_code"] for s in spans] == [3, 8]
    assert all(not s.status.is_ok for s in spans)
    assert len({s.context.trace_id for s in spans}) == 2


def test_tracing_off_imports_no_opentelemetry() -> None:
    """Off (the default): a whole conversation through the three services runs without
    importing anything from opentelemetry, so no span can exist and no hook costs more than
    a check per session. A fresh interpreter: this one has the SDK loaded by other tests."""
    script = (
        "import asyncio, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_tracing import run_sessions\n"
        "for mode in ('mux', 'per-session'):\n"
        "    (outcome,) = asyncio.run(run_sessions(mode))\n"
        "    assert outcome.code.name == 'OK' and outcome.frames > 0, outcome\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_otel_endpoint_without_the_extra_is_one_clear_line(monkeypatch, capsys) -> None:
    import importlib.util

    from moshi_grpc import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: None if n.startswith("opentelemetry") else real(n, *a),
    )
    argv = ["gateway", "--otel-endpoint", "http://127.0.0.1:4317"]
    assert cli.main([*argv, "--codec-addr", "127.0.0.1:1", "--lm-addr", "127.0.0.1:2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--otel-endpoint" in err[0], err
    assert "pip install 'moshi-grpc[otel]'" in err[0]
    assert not tracing.enabled()


def test_setup_exports_over_otlp_and_checks_the_endpoint() -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc")
    with pytest.raises(ValueError, match="give a scheme"):
        tracing.setup("127.0.0.1:4317", "gateway")
    assert not tracing.enabled()
    try:
        # Nothing listens there: the exporter connects lazily, and no span is sent.
        tracing.setup("http://127.0.0.1:9", "codec")
        assert tracing.enabled()
    finally:
        tracing.shutdown()
    assert not tracing.enabled()


@pytest.mark.slow
def test_up_exports_one_trace_over_otlp(tmp_path) -> None:
    """The real path: `moshi-grpc up --otel-endpoint` (three processes, batched OTLP/gRPC
    export, flushed when each service drains) to a collector stand-in on loopback that
    records every exported span. The demo's one conversation is one trace."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc")  # the [otel] extra
    import threading
    from concurrent import futures

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list[tuple[str, str, bytes, bytes, bytes]] = []
    lock = threading.Lock()

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            with lock:
                for resource_spans in request.resource_spans:
                    attrs = {
                        a.key: a.value.string_value for a in resource_spans.resource.attributes
                    }
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            received.append(
                                (
                                    attrs["service.name"],
                                    span.name,
                                    span.trace_id,
                                    span.span_id,
                                    span.parent_span_id,
                                )
                            )
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    argv = ["up", "--model", "echo", "--demo", str(tmp_path), "--demo-seconds", "1"]
    argv += ["--otel-endpoint", f"http://127.0.0.1:{port}"]
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "moshi_grpc.cli", *argv],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        server.stop(0)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    services = {(service, name) for service, name, *_ in received}
    assert services == {
        ("gateway", "gateway.session"),
        *(("gateway", name) for name in GATEWAY_STREAMS),
        *((name.split(".")[0], name) for name in BACKEND_SPANS),
    }, received
    assert len(received) == 7
    assert len({trace_id for _, _, trace_id, _, _ in received}) == 1
    span_ids = {span_id for *_, span_id, _ in received}
    roots = [name for _, name, _, _, parent in received if not parent]
    assert roots == ["gateway.session"]
    assert all(parent in span_ids for *_, parent in received if parent)
