"""Fault injection: backends killed (-9), frozen (SIGSTOP/SIGCONT) or drained (SIGTERM)
mid-session, a network stall (--inject-delay-ms), a slow client that does not read, a client
that disconnects, and a burst of short sessions.

What every fault must give: no hang (every wait has a timeout and a hang fails the test), no
crash elsewhere (the other processes stay up and healthy), slots freed (backend Info
slots_in_use back to 0), a clear status for the session, and the metrics counting it
(scraped over HTTP and parsed with prometheus_client.parser).

kill -9 and SIGSTOP need real processes: codec, LM and gateway run as `moshi-grpc`
subprocesses (echo models) sharing one module-scoped stack; a killed backend is restarted on
the same port, which also checks that the gateway picks it up again. The other faults use an
in-process stack (cheaper on the 2-core CI machine).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from svc_harness import (
    SERVING,
    LoopThread,
    ServiceProcess,
    StreamDriver,
    channel,
    health_status_sync,
    metric_value,
    scrape,
)

from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.v1 import codec_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc, lm_pb2_grpc

FRAME = 1920
ECHO_ARGS = ["--model", "echo", "--max-sessions", "4", "--idle-timeout-s", "30"]


def _pcm(seed: int, n: int = FRAME) -> bytes:
    return np.random.default_rng(seed).uniform(-0.5, 0.5, n).astype("<f4").tobytes()


def _config(**kw) -> gateway_pb2.ConverseRequest:
    kw.setdefault("sample_rate", 24000)
    kw.setdefault("encoding", gateway_pb2.AUDIO_ENCODING_FLOAT32)
    kw.setdefault("seed", 3)
    kw.setdefault("budget_ms", 2000)
    kw.setdefault("max_consecutive_misses", 0)
    return gateway_pb2.ConverseRequest(config=gateway_pb2.SessionConfig(**kw))


def _chunk(i: int, frames: int = 1) -> gateway_pb2.ConverseRequest:
    return gateway_pb2.ConverseRequest(audio=gateway_pb2.AudioChunk(data=_pcm(i, frames * FRAME)))


def _audio(replies: list) -> list:
    return [r.audio for r in replies if r.WhichOneof("kind") == "audio"]


def _summary(replies: list):
    for r in replies:
        if r.WhichOneof("kind") == "event" and r.event.WhichOneof("kind") == "ended":
            return r.event.ended.summary
    return None


def _is_audio(index: int) -> Callable:
    return lambda r: r.WhichOneof("kind") == "audio" and r.audio.frame_index == index


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def codec_slots(address: str) -> int:
    with channel(address) as ch:
        return codec_pb2_grpc.CodecStub(ch).Info(common_pb2.InfoRequest(), timeout=3).slots_in_use


def lm_slots(address: str) -> int:
    with channel(address) as ch:
        return lm_pb2_grpc.LMStub(ch).Info(common_pb2.InfoRequest(), timeout=3).slots_in_use


def run_session(address: str, frames: int, *, pace_s: float = 0.02, **config) -> StreamDriver:
    """A complete paced session; returns the finished driver."""
    with channel(address) as ch:
        d = StreamDriver(gateway_pb2_grpc.GatewayStub(ch).Converse, _config(**config), timeout=60)
        for i in range(frames):
            d.send(_chunk(i))
            time.sleep(pace_s)
        d.close()
        d.wait(60)
    return d


# ----------------------------------------------------------------------------- subprocesses


class ProcStack:
    """codec + LM + gateway subprocesses on fixed loopback ports."""

    def __init__(self, tmp: Path, ports: Callable[[], int]) -> None:
        self.tmp = tmp
        self.ports = {name: (ports(), ports()) for name in ("codec", "lm", "gateway")}
        self.restarts = 0
        self.procs: dict[str, ServiceProcess] = {}
        self.start("codec", wait=False)
        self.start("lm", wait=False)
        self.procs["codec"].wait_serving()
        self.procs["lm"].wait_serving()
        self.start("gateway")

    def start(self, name: str, *, wait: bool = True) -> ServiceProcess:
        port, metrics_port = self.ports[name]
        if name == "gateway":
            args = [
                "--codec-addr",
                self.procs["codec"].address,
                "--lm-addr",
                self.procs["lm"].address,
                "--refresh-interval-s",
                "0.2",
                "--idle-timeout-s",
                "10",
            ]
        else:
            args = ECHO_ARGS
        log = self.tmp / f"{name}.{self.restarts}.log"
        self.restarts += 1
        proc = ServiceProcess(name, port, metrics_port, args, log)
        self.procs[name] = proc
        if wait:
            proc.wait_serving()
        return proc

    def __getitem__(self, name: str) -> ServiceProcess:
        return self.procs[name]

    def gateway_metrics(self) -> dict:
        return scrape(self["gateway"].metrics_url)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()


@pytest.fixture(scope="module")
def procs(
    tmp_path_factory: pytest.TempPathFactory, free_port_factory_module
) -> Iterator[ProcStack]:
    stack = ProcStack(tmp_path_factory.mktemp("faults"), free_port_factory_module)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def free_port_factory_module():
    from conftest import _free_port

    return _free_port


def _ensure_serving(procs: ProcStack) -> None:
    for name in ("codec", "lm", "gateway"):
        if not procs[name].alive():
            procs.start(name)
    wait_until(
        lambda: run_session(procs["gateway"].address, 2).code == grpc.StatusCode.OK,
        20,
        "a session to succeed on the (re)started stack",
    )


def _kill_mid_session(procs: ProcStack, victim: str, signum: int) -> StreamDriver:
    """Start a session, let frames flow, signal `victim`, keep sending until it ends."""
    gw = procs["gateway"]
    with channel(gw.address) as ch:
        d = StreamDriver(gateway_pb2_grpc.GatewayStub(ch).Converse, _config(), timeout=60)
        for i in range(4):
            d.send(_chunk(i))
            time.sleep(0.04)
        assert d.wait_for(_is_audio(2), 10), "session never produced audio"
        procs[victim].signal(signum)
        for i in range(4, 200):
            if d.done():
                break
            d.send(_chunk(i))
            time.sleep(0.04)
        d.wait(20)
        d.close()
    return d


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["lm", "codec"])
def test_kill9_backend_mid_session(procs: ProcStack, victim: str) -> None:
    _ensure_serving(procs)
    before = procs.gateway_metrics()
    d = _kill_mid_session(procs, victim, signal.SIGKILL)
    # A clear, retryable status naming the failed replica.
    assert d.code == grpc.StatusCode.UNAVAILABLE, (d.code, d.details)
    assert victim in d.details and procs[victim].address in d.details, d.details
    summary = _summary(d.replies)
    assert summary is not None and summary.reason == "backend_failed"
    assert summary.frames_out == len(_audio(d.replies))
    # Nothing else crashed; the survivor's slots are freed.
    gw = procs["gateway"]
    assert gw.alive() and health_status_sync(gw.address) == SERVING
    survivor = "codec" if victim == "lm" else "lm"
    assert procs[survivor].alive()
    slots = codec_slots if survivor == "codec" else lm_slots
    wait_until(lambda: slots(procs[survivor].address) == 0, 10, f"{survivor} slots freed")
    # While the victim is down new sessions are refused fast, with a retryable status.
    wait_until(
        lambda: (
            run_session(gw.address, 1).code
            in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
        ),
        10,
        "refusal while the backend is down",
    )
    after = procs.gateway_metrics()
    assert (
        metric_value(after, "moshi_gateway_sessions_ended_total", reason="backend_failed")
        - (metric_value(before, "moshi_gateway_sessions_ended_total", reason="backend_failed"))
        >= 1
    )
    assert metric_value(
        after, "grpc_server_handled_total", grpc_method="Converse", grpc_code="UNAVAILABLE"
    ) > metric_value(
        before, "grpc_server_handled_total", grpc_method="Converse", grpc_code="UNAVAILABLE"
    )
    # The restarted backend (same port) is picked up again and serves full sessions.
    procs.start(victim)
    wait_until(lambda: run_session(gw.address, 3).code == grpc.StatusCode.OK, 20, "recovery")
    d = run_session(gw.address, 5)
    assert len(_audio(d.replies)) == 5
    assert codec_slots(procs["codec"].address) == 0
    wait_until(lambda: lm_slots(procs["lm"].address) == 0, 5, "lm slots freed")


@pytest.mark.slow
def test_sigstop_lm_mid_session_then_sigcont(procs: ProcStack) -> None:
    """A frozen LM: frames miss their budget, the session ends with DEADLINE_EXCEEDED after
    the configured consecutive misses (no hang); after SIGCONT the LM frees the slot and the
    stack serves again."""
    _ensure_serving(procs)
    gw = procs["gateway"]
    before = procs.gateway_metrics()
    with channel(gw.address) as ch:
        d = StreamDriver(
            gateway_pb2_grpc.GatewayStub(ch).Converse,
            _config(budget_ms=300, max_consecutive_misses=4),
            timeout=60,
        )
        try:
            for i in range(3):
                d.send(_chunk(i))
                time.sleep(0.08)
            assert d.wait_for(_is_audio(1), 10)
            procs["lm"].signal(signal.SIGSTOP)
            for i in range(3, 200):
                if d.done():
                    break
                d.send(_chunk(i))
                time.sleep(0.08)
            code = d.wait(20)
        finally:
            procs["lm"].signal(signal.SIGCONT)
            d.close()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, d.details)
    # The K-miss streak, or the stage watch when the client's frames came too slowly to be
    # counted (the LM not answering for the budget + K frames' time): both end it here.
    assert "budget" in d.details
    summary = _summary(d.replies)
    assert summary is not None and summary.reason == "deadline_exceeded"
    assert summary.frames_late >= 1
    misses = [
        r.event.budget_missed
        for r in d.replies
        if r.WhichOneof("kind") == "event" and r.event.WhichOneof("kind") == "budget_missed"
    ]
    assert len(misses) == summary.frames_late
    assert procs["lm"].alive() and procs["codec"].alive() and gw.alive()
    wait_until(lambda: lm_slots(procs["lm"].address) == 0, 10, "LM slot freed after SIGCONT")
    wait_until(lambda: codec_slots(procs["codec"].address) == 0, 10, "codec slots freed")
    after = procs.gateway_metrics()

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("moshi_gateway_budget_misses_total") >= summary.frames_late
    assert delta("moshi_gateway_sessions_ended_total", reason="deadline_exceeded") == 1
    assert delta("grpc_server_handled_total", grpc_code="DEADLINE_EXCEEDED") == 1
    assert run_session(gw.address, 3).code == grpc.StatusCode.OK


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["codec", "lm"])
def test_sigstop_backend_at_default_settings_ends_the_session(
    procs: ProcStack, victim: str
) -> None:
    """The issue's reproduction: a real-time session at the gateway's default budget, K and
    backlog, then SIGSTOP on the codec (or the LM, the only replica: no failover). The
    client never stops sending, so only the gateway can end the session: DEADLINE_EXCEEDED
    (K misses, or the stage watch) or UNAVAILABLE (the replica fails its health probe),
    with its summary; never 30 s of silence until the client gives up."""
    _ensure_serving(procs)
    gw = procs["gateway"]
    with channel(gw.address) as ch:
        config = gateway_pb2.ConverseRequest(
            config=gateway_pb2.SessionConfig(
                sample_rate=24000, encoding=gateway_pb2.AUDIO_ENCODING_FLOAT32, seed=3
            )
        )
        d = StreamDriver(gateway_pb2_grpc.GatewayStub(ch).Converse, config, timeout=120)
        sent = 0
        try:
            for i in range(3):
                d.send(_chunk(i))
                time.sleep(0.08)
            assert d.wait_for(_is_audio(1), 10)
            procs[victim].signal(signal.SIGSTOP)
            for i in range(3, 1200):  # up to ~96 s of real-time audio: never closes
                if d.done():
                    break
                d.send(_chunk(i))
                sent = i + 1
                time.sleep(0.08)
            code = d.wait(20)
        finally:
            procs[victim].signal(signal.SIGCONT)
            d.close()
    assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE), (
        code,
        d.details,
    )
    summary = _summary(d.replies)
    assert summary is not None
    assert summary.reason in ("deadline_exceeded", "backend_failed")
    assert sent < 1200  # the gateway ended it, not the client running out of audio
    assert summary.frames_in == summary.frames_out  # every frame it took is accounted for
    wait_until(lambda: codec_slots(procs["codec"].address) == 0, 10, "codec slots freed")
    wait_until(lambda: lm_slots(procs["lm"].address) == 0, 10, "LM slot freed")
    wait_until(
        lambda: run_session(gw.address, 3).code == grpc.StatusCode.OK,
        20,
        "a session to succeed once the backend is back (its next health probe)",
    )


@pytest.mark.slow
def test_sigterm_backend_drains_live_session(procs: ProcStack) -> None:
    """SIGTERM on the LM (a rolling update): the live session keeps its replica and finishes
    with every frame, new sessions are refused with a retryable status meanwhile, and the LM
    exits 0 once the session is done."""
    _ensure_serving(procs)
    gw = procs["gateway"]
    with channel(gw.address) as ch:
        d = StreamDriver(gateway_pb2_grpc.GatewayStub(ch).Converse, _config(), timeout=60)
        for i in range(3):
            d.send(_chunk(i))
            time.sleep(0.04)
        assert d.wait_for(_is_audio(1), 10)
        procs["lm"].signal(signal.SIGTERM)
        wait_until(
            lambda: (
                run_session(gw.address, 1).code
                in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
            ),
            10,
            "new sessions refused while the LM drains",
        )
        for i in range(3, 15):
            d.send(_chunk(i))
            time.sleep(0.04)
        d.close()
        assert d.wait(20) == grpc.StatusCode.OK, d.details
    audio = _audio(d.replies)
    assert [a.frame_index for a in audio] == list(range(15))
    assert sum(a.silence for a in audio) == 1  # only the LM's initial delay
    assert procs["lm"].proc.wait(15) == 0
    procs.start("lm")


# ----------------------------------------------------------------------------- in-process


class InProc:
    def __init__(self, *, lm_delay_ms: float = 0.0, **settings) -> None:
        from moshi_grpc.services.codec.engine import CodecOptions
        from moshi_grpc.services.codec.startup import start_codec_server
        from moshi_grpc.services.gateway.cli import start_gateway
        from moshi_grpc.services.gateway.config import GatewaySettings
        from moshi_grpc.services.lm.engine import LmOptions
        from moshi_grpc.services.lm.startup import start_lm_server

        def cfg() -> ServerConfig:
            return ServerConfig(host="127.0.0.1", port=0, metrics_port=0, idle_timeout_s=30)

        self.loop = LoopThread()
        self.codec = self.loop.run(
            start_codec_server(cfg(), CodecOptions(model="echo", max_sessions=4))
        )
        self.lm = self.loop.run(
            start_lm_server(
                cfg(), LmOptions(model="echo", max_sessions=4, inject_delay_ms=lm_delay_ms)
            )
        )
        self.gateway = self.loop.run(
            start_gateway(cfg(), self.codec.address, self.lm.address, GatewaySettings(**settings))
        )

    def metrics(self) -> dict:
        return scrape(self.gateway.server.metrics_url)

    def close(self) -> None:
        for srv in (self.gateway, self.lm, self.codec):
            self.loop.run(srv.stop(0))
        self.loop.close()


@pytest.fixture
def inproc_factory() -> Iterator[Callable[..., InProc]]:
    made: list[InProc] = []

    def make(**kw) -> InProc:
        made.append(InProc(**kw))
        return made[-1]

    yield make
    for stack in made:
        stack.close()


def test_network_stall_frames_counted_late(inproc_factory) -> None:
    """An LM that takes 250 ms per step (--inject-delay-ms) against a 150 ms budget: frames
    are replaced by silence and counted late, every input frame still has an output, and the
    metric counts exactly the late frames."""
    stack = inproc_factory(lm_delay_ms=250.0)
    d = run_session(stack.gateway.address, 8, pace_s=0.08, budget_ms=150, max_consecutive_misses=0)
    assert d.code == grpc.StatusCode.OK, d.details
    summary = _summary(d.replies)
    audio = _audio(d.replies)
    assert summary.frames_in == summary.frames_out == len(audio) == 8
    assert summary.frames_late >= 1
    assert sum(a.silence for a in audio) >= summary.frames_late
    m = stack.metrics()
    assert metric_value(m, "moshi_gateway_budget_misses_total") == summary.frames_late
    assert metric_value(m, "moshi_gateway_frames_total") == 8
    wait_until(lambda: lm_slots(stack.lm.address) == 0, 10, "LM slot freed")


def test_client_disconnect_mid_stream_frees_slots(inproc_factory) -> None:
    stack = inproc_factory()
    gw = stack.gateway.address
    with channel(gw) as ch:
        d = StreamDriver(gateway_pb2_grpc.GatewayStub(ch).Converse, _config(), timeout=30)
        for i in range(4):
            d.send(_chunk(i))
            time.sleep(0.03)
        assert d.wait_for(_is_audio(2), 10)
        assert lm_slots(stack.lm.address) == 1
        d.cancel()
        assert d.wait(10) == grpc.StatusCode.CANCELLED
    wait_until(lambda: lm_slots(stack.lm.address) == 0, 10, "LM slot freed")
    wait_until(lambda: codec_slots(stack.codec.address) == 0, 10, "codec slots freed")
    wait_until(
        lambda: (
            metric_value(stack.metrics(), "moshi_gateway_sessions_ended_total", reason="cancelled")
            == 1
        ),
        10,
        "cancelled session counted",
    )
    assert metric_value(stack.metrics(), "moshi_gateway_sessions_active") == 0
    assert health_status_sync(gw) == SERVING
    assert len(_audio(run_session(gw, 3).replies)) == 3


def _slow_client(stack: InProc, chunks: int = 800) -> StreamDriver:
    """Offer `chunks` x 5 frames at once and never read a reply."""
    ch = channel(stack.gateway.address)
    d = StreamDriver(
        gateway_pb2_grpc.GatewayStub(ch).Converse, _config(budget_ms=10_000), timeout=40, read=False
    )
    d.channel = ch  # type: ignore[attr-defined]
    for i in range(chunks):
        d.send(_chunk(i, frames=5))
    return d


def _only_session(stack: InProc):
    """The gateway's one live session (None before it starts and after it ended)."""
    sessions = list(stack.gateway.servicer.sessions.values())
    return sessions[0] if sessions else None


def test_slow_client_is_bounded(inproc_factory) -> None:
    """A client that sends but never reads: its replies fill gRPC's flow-control window, the
    gateway's pending frames reach `max_pending_frames`, and there it stops reading (gRPC
    flow control then holds the client back), so memory stays bounded; a disconnect then
    frees the slots. The event waited for is the gateway's own state (its bound reached),
    not a pause in the client's sending."""
    bound = 16
    stack = inproc_factory(max_pending_frames=bound, idle_timeout_s=30.0)
    d = _slow_client(stack)
    offered = 800 * 5

    def at_bound() -> bool:
        session = _only_session(stack)
        return session is not None and session.seq.pending >= bound

    wait_until(at_bound, 20, f"the gateway to hold {bound} pending frames")
    session = _only_session(stack)
    pending, taken = session.seq.pending, session.seq.frames_in
    # At the bound, not past it: reading stopped there (a gateway that kept reading would
    # be far past it, every frame read adding one whose reply cannot leave).
    assert pending == bound, f"the gateway kept reading: {pending} pending frames"
    assert taken < offered and d._queue.qsize() > 0, "the gateway read everything (unbounded)"
    consumed_mib = taken * FRAME * 4 / 2**20
    print(f"slow client: the gateway took {taken} of {offered} frames ({consumed_mib:.1f} MiB)")
    # Disconnecting frees everything.
    d.cancel()
    d.start_reading()
    assert d.wait(10) == grpc.StatusCode.CANCELLED
    d.channel.close()
    wait_until(lambda: lm_slots(stack.lm.address) == 0, 10, "LM slot freed")
    wait_until(lambda: codec_slots(stack.codec.address) == 0, 10, "codec slots freed")
    assert health_status_sync(stack.gateway.address) == SERVING


def test_slow_client_session_ends_with_clear_status(inproc_factory) -> None:
    """A client that never reads and never cancels: the gateway stops reading it, its idle
    check still runs (the writer is not stuck), so the session ends on its own, frees the
    backend slots it held, and the client finds a clear status once it looks."""
    stack = inproc_factory(idle_timeout_s=1.0)
    d = _slow_client(stack)
    try:
        wait_until(
            lambda: metric_value(stack.metrics(), "moshi_gateway_sessions_ended_total") == 1,
            20,
            "the session to end on its own",
        )
        m = stack.metrics()
        assert metric_value(m, "moshi_gateway_sessions_ended_total", reason="idle_timeout") == 1
        assert metric_value(m, "moshi_gateway_sessions_active") == 0
        # While it ran the session held a slot at each backend (leases are counted)...
        lm, codec = scrape(stack.lm.metrics_url), scrape(stack.codec.metrics_url)
        assert metric_value(lm, "moshi_lm_streams_started_total") == 1
        assert metric_value(codec, "moshi_codec_streams_started_total", stage="encode") == 1
        assert metric_value(codec, "moshi_codec_streams_started_total", stage="decode") == 1
        # ...and it gave them back when it ended, though the client still has not read.
        wait_until(lambda: lm_slots(stack.lm.address) == 0, 10, "LM slot freed")
        wait_until(lambda: codec_slots(stack.codec.address) == 0, 10, "codec slots freed")
        d.start_reading()
        assert d.wait(10) == grpc.StatusCode.DEADLINE_EXCEEDED, (d.code, d.details)
        assert "client" in d.details
    finally:
        d.cancel()
        d.channel.close()


def test_burst_of_short_sessions_is_not_refused(inproc_factory) -> None:
    """Sessions run one after another (each ends before the next starts) never need more
    than one slot, so none may be refused, however fast they follow each other."""
    stack = inproc_factory(refresh_interval_s=5.0)
    codes = [run_session(stack.gateway.address, 1, pace_s=0.0).code for _ in range(6)]
    assert codes == [grpc.StatusCode.OK] * 6, codes
