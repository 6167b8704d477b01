"""`moshi-grpc gateway`: the session gateway (public Converse API).

`start_gateway(...)` starts it in-process (tests, benchmarks); `run(args)` is the console
entry point: serve until SIGTERM/SIGINT, then drain.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from moshi_grpc.services.common import flags, logs, tracing
from moshi_grpc.services.common.metrics import GatewayMetrics, new_registry
from moshi_grpc.services.common.server import (
    RunningServer,
    ServerConfig,
    ServerState,
    Service,
    start_server,
)
from moshi_grpc.services.gateway.config import GatewaySettings
from moshi_grpc.services.gateway.replicas import (
    ChannelSettings,
    CostSettings,
    ReplicaPool,
    ReplicaSpecError,
    Spec,
    parse_specs,
)
from moshi_grpc.services.gateway.servicer import GatewayServicer
from moshi_grpc.services.gateway.streams import MODES
from moshi_grpc.services.gateway.text_policy import load_policy
from moshi_grpc.v1 import gateway_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "moshi_grpc.v1.Gateway"
BACKEND_AUTH_ENV = "MOSHI_GRPC_BACKEND_AUTH_TOKEN"
# A longer coalescing window would spend a large part of a frame's budget per stage.
MAX_MUX_COALESCE_MS = 20.0

# Channels to backends: generous message limits, keepalive within the backends' enforcement
# (min ping interval 10 s there), and no gRPC-level retries (a session is pinned).
BACKEND_CHANNEL_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.enable_retries", 0),
)


class GatewayServer:
    """A started gateway: the common `RunningServer` plus its pool and servicer."""

    def __init__(self, server: RunningServer, pool: ReplicaPool, servicer: GatewayServicer):
        self.server = server
        self.pool = pool
        self.servicer = servicer

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def registry(self):
        return self.server.registry

    async def stop(self, grace_s: float | None = 0.0) -> None:
        await self.server.stop(grace_s)

    async def __aenter__(self) -> GatewayServer:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop(0)


async def start_gateway(
    config: ServerConfig,
    codec: list[Spec] | list[str] | str,
    lm: list[Spec] | list[str] | str,
    settings: GatewaySettings | None = None,
    channels: ChannelSettings | None = None,
    *,
    resolver=None,
) -> GatewayServer:
    """Start a gateway in this event loop; backends are probed once before it serves."""
    settings = settings or GatewaySettings()
    if settings.backend_streams not in MODES:
        raise ValueError(
            f"backend_streams must be one of {', '.join(MODES)}, got {settings.backend_streams!r}"
        )
    if not 0.0 <= settings.mux_coalesce_ms <= MAX_MUX_COALESCE_MS:
        raise ValueError(
            f"mux_coalesce_ms must be within 0..{MAX_MUX_COALESCE_MS:g}, "
            f"got {settings.mux_coalesce_ms!r}"
        )
    channels = channels or ChannelSettings(options=BACKEND_CHANNEL_OPTIONS)
    codec_specs = codec if codec and isinstance(codec[0], Spec) else parse_specs(codec)
    lm_specs = lm if lm and isinstance(lm[0], Spec) else parse_specs(lm)
    registry = new_registry()
    metrics = GatewayMetrics.create(registry)

    def on_refresh(pool: ReplicaPool) -> None:
        metrics.backends_healthy.labels("codec").set(pool.codec.healthy_count())
        metrics.backends_healthy.labels("lm").set(pool.lm.healthy_count())

    extra = {"resolver": resolver} if resolver is not None else {}
    pool = ReplicaPool(
        codec_specs,
        lm_specs,
        channels,
        refresh_interval_s=settings.refresh_interval_s,
        probe_timeout_s=settings.probe_timeout_s,
        on_refresh=on_refresh,
        cost=CostSettings(
            batch_wait_ms=settings.batch_wait_ms,
            unmeasured_stage_ms=settings.unmeasured_stage_ms,
            sample_ttl_s=settings.cost_sample_ttl_s,
        ),
        retry_after_ms=settings.retry_after_ms,
        **extra,
    )
    await pool.start()
    state = ServerState()
    servicer = GatewayServicer(pool, settings, metrics, state)
    try:
        server = await start_server(
            config,
            [
                Service(
                    SERVICE_NAME,
                    lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, s),
                )
            ],
            "gateway",
            registry=registry,
            state=state,
        )
    except BaseException:
        await pool.stop()
        raise
    server.on_stop(pool.stop)
    return GatewayServer(server, pool, servicer)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_server_flags(parser, "gateway")
    d = GatewaySettings()
    w = parser.add_argument_group("processes")
    w.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway processes sharing the gRPC port (SO_REUSEPORT: the kernel spreads new "
        "connections over them), each with its own backend channels and mux streams. "
        "Metrics: worker i serves /metrics on --metrics-port + i (ephemeral ports with "
        "--metrics-port 0); scrape every worker and sum. Limits (--max-sessions-per-client) "
        "are per worker",
    )
    w.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    g = parser.add_argument_group("backends")
    g.add_argument(
        "--codec-addr",
        action="append",
        required=True,
        help="codec replicas: host:port[,host:port...] or dns:///name:port (every address the "
        "name resolves to, re-resolved periodically: Kubernetes headless services); repeatable",
    )
    g.add_argument("--lm-addr", action="append", required=True, help="LM replicas, same forms")
    g.add_argument(
        "--backend-auth-token",
        default=None,
        help=f"bearer token sent to the backends (default: env {BACKEND_AUTH_ENV})",
    )
    g.add_argument(
        "--backend-tls-ca", default=None, help="PEM CA of the backends' TLS certificates"
    )
    g.add_argument(
        "--backend-tls-cert",
        default=None,
        help="PEM client certificate for backends that require mTLS (with --backend-tls-key)",
    )
    g.add_argument("--backend-tls-key", default=None, help="PEM key of --backend-tls-cert")
    g.add_argument(
        "--backend-tls-server-name",
        default=None,
        help="expected server name in the backends' certificates (when dialing by IP)",
    )
    g.add_argument(
        "--backend-streams",
        choices=["mux", "per-session"],
        default=d.backend_streams,
        help="mux: all sessions on a backend replica share one multiplexed stream per stage "
        "(EncodeMux/StepMux/DecodeMux, many sessions per message: far less gateway CPU per "
        "frame); per-session: each session opens its own Encode/Step/Decode streams",
    )
    g.add_argument(
        "--mux-coalesce-ms",
        type=float,
        default=d.mux_coalesce_ms,
        help="mux: on a stream busy enough to collect more entries in this time, wait this "
        "long after the first pending entry before sending (fewer, larger backend messages: "
        "less gateway CPU per frame, for up to this much added latency per stage); 0 (the "
        f"default): never wait (0..{MAX_MUX_COALESCE_MS:g})",
    )
    g.add_argument(
        "--refresh-interval-s",
        type=float,
        default=d.refresh_interval_s,
        help="how often backends are re-resolved and probed (health + Info)",
    )
    b = parser.add_argument_group("sessions")
    b.add_argument(
        "--budget-ms",
        type=int,
        default=d.default_budget_ms,
        help="default per-frame latency budget (a frame's output is due this long after its "
        "input frame is complete; sessions may set their own)",
    )
    b.add_argument(
        "--max-consecutive-misses",
        type=int,
        default=d.default_max_consecutive_misses,
        help="default: end a session with DEADLINE_EXCEEDED after this many misses in a row "
        "(0 = never)",
    )
    b.add_argument(
        "--max-backlog-frames",
        type=int,
        default=d.max_backlog_frames,
        help="frames of one session allowed at the backends at once; more input is dropped "
        "(and counted) instead of queued",
    )
    b.add_argument(
        "--flow-window-frames",
        type=int,
        default=d.flow_window_frames,
        help="sessions with input_pacing FLOW_CONTROL (pre-recorded audio): frames at the "
        "backends at once before the gateway stops reading the client",
    )
    b.add_argument(
        "--resample-quality",
        default=d.resample_quality,
        choices=["LQ", "MQ", "HQ", "VHQ"],
        help="soxr resampler quality (LQ: ~20 ms filter delay; HQ: ~38 ms)",
    )
    b.add_argument(
        "--max-session-s",
        type=float,
        default=d.max_session_s,
        help="end a session after this many seconds with its summary, reason "
        '"max_session_length", status DEADLINE_EXCEEDED (0 = unlimited)',
    )
    b.add_argument(
        "--max-sessions-per-client",
        type=int,
        default=d.max_sessions_per_client,
        help="live sessions allowed per client (its SessionConfig.client_id, else its IP "
        "address); more are refused with RESOURCE_EXHAUSTED (0 = no limit)",
    )
    b.add_argument(
        "--lm-failover",
        action=argparse.BooleanOptionalAction,
        default=d.lm_failover,
        help="when a session's LM replica fails, replay its history onto another LM replica "
        "with a free slot and carry on (codec failures still end the session)",
    )
    b.add_argument(
        "--lm-history-steps",
        type=int,
        default=d.lm_history_steps,
        help="LM steps of history kept per session for failover replay (the LM's context is "
        "3000 steps = 240 s; older steps are forgotten)",
    )
    b.add_argument(
        "--retry-after-ms",
        type=int,
        default=d.retry_after_ms,
        help="retry hint given with RESOURCE_EXHAUSTED refusals (budget refusals: at least "
        "this, or until the recent step samples that caused them expire)",
    )
    a = parser.add_argument_group("admission from measured cost")
    a.add_argument(
        "--batch-wait-ms",
        type=float,
        default=d.batch_wait_ms,
        help="the backends' --max-wait-ms: added once per stage (encode, step, decode) to a "
        "new session's predicted frame latency",
    )
    a.add_argument(
        "--unmeasured-stage-ms",
        type=float,
        default=d.unmeasured_stage_ms,
        help="cost assumed per stage on a replica whose Info reports no bucket timings yet "
        "(a fresh replica then refuses budgets below ~55 ms and admits the default)",
    )
    a.add_argument(
        "--cost-sample-ttl-s",
        type=float,
        default=d.cost_sample_ttl_s,
        help="how long a replica's recent step-time samples count (half-life a third of it)",
    )
    parser.add_argument(
        "--text-policy",
        metavar="RULES|module:object",
        default=None,
        help="text safety hook (a mitigation, not a guarantee): a rules file (lines "
        "'redact WORD', 'mute[:FRAMES] re:REGEX', 'end WORD') or a module:object with "
        "check(piece, context); see services/gateway/text_policy.py",
    )


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    if args.budget_ms < 1:
        raise ValueError("--budget-ms must be >= 1")
    if args.max_backlog_frames < 1:
        raise ValueError("--max-backlog-frames must be >= 1")
    if args.max_session_s < 0:
        raise ValueError("--max-session-s must be >= 0 (0 = unlimited)")
    if args.max_sessions_per_client < 0:
        raise ValueError("--max-sessions-per-client must be >= 0 (0 = no limit)")
    if args.lm_history_steps < 1:
        raise ValueError("--lm-history-steps must be >= 1")
    if args.flow_window_frames < 1:
        raise ValueError("--flow-window-frames must be >= 1")
    if args.batch_wait_ms < 0 or args.unmeasured_stage_ms < 0:
        raise ValueError("--batch-wait-ms and --unmeasured-stage-ms must be >= 0")
    if args.cost_sample_ttl_s <= 0:
        raise ValueError("--cost-sample-ttl-s must be > 0")
    return GatewaySettings(
        default_budget_ms=args.budget_ms,
        default_max_consecutive_misses=max(0, args.max_consecutive_misses),
        max_backlog_frames=args.max_backlog_frames,
        flow_window_frames=args.flow_window_frames,
        batch_wait_ms=args.batch_wait_ms,
        unmeasured_stage_ms=args.unmeasured_stage_ms,
        cost_sample_ttl_s=args.cost_sample_ttl_s,
        resample_quality=args.resample_quality,
        idle_timeout_s=args.idle_timeout_s,
        retry_after_ms=args.retry_after_ms,
        refresh_interval_s=args.refresh_interval_s,
        max_session_s=args.max_session_s,
        max_sessions_per_client=args.max_sessions_per_client,
        lm_failover=args.lm_failover,
        lm_history_steps=args.lm_history_steps,
        backend_streams=args.backend_streams,
        mux_coalesce_ms=args.mux_coalesce_ms,
        text_policy=load_policy(args.text_policy) if args.text_policy else None,
    )


def _read_pem(path: str | None, flag: str) -> bytes | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{flag} file not found: {p}")
    return p.read_bytes()


def channels_from_args(args: argparse.Namespace) -> ChannelSettings:
    token = args.backend_auth_token or os.environ.get(BACKEND_AUTH_ENV) or None
    ca = _read_pem(args.backend_tls_ca, "--backend-tls-ca")
    cert = _read_pem(args.backend_tls_cert, "--backend-tls-cert")
    key = _read_pem(args.backend_tls_key, "--backend-tls-key")
    if (cert is None) != (key is None):
        raise ValueError("--backend-tls-cert and --backend-tls-key go together")
    options = list(BACKEND_CHANNEL_OPTIONS)
    if args.backend_tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.backend_tls_server_name))
    return ChannelSettings(
        tls_ca=ca,
        auth_token=token,
        options=tuple(options),
        tls_client_cert=cert,
        tls_client_key=key,
    )


async def _serve(args: argparse.Namespace) -> int:
    config = flags.server_config_from_args(args)
    if args.worker_index is not None:
        config.reuse_port = True
    gateway = await start_gateway(
        config,
        parse_specs(args.codec_addr),
        parse_specs(args.lm_addr),
        settings_from_args(args),
        channels_from_args(args),
    )
    gateway.server.install_signal_handlers()
    # Per frame the gateway allocates short-lived objects (messages, futures, arrays); the
    # cyclic collector's older-generation passes would walk every long-lived object
    # (modules, protobuf descriptors, grpc and server state) over and over. Freeze what
    # exists once serving, and collect the young generation less often.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])
    if args.worker_index is None:
        log.info("gateway listening on %s", gateway.address)
    else:
        log.info(
            "gateway worker %d/%d listening on %s",
            args.worker_index,
            args.workers,
            gateway.address,
        )
    await gateway.server.wait_closed()
    return 0


# Allocations between young-generation collections (CPython's default: 700).
GC_THRESHOLD0 = 10_000


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) `host:port` with SO_REUSEPORT, as gRPC's multiprocessing example
    does: the port is held for the workers (port 0: a free one is picked) and this socket
    takes no connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _supervise(args: argparse.Namespace) -> int:
    """`--workers N`: start N gateway processes on one port, forward SIGTERM/SIGINT to them
    (each drains), and exit when they have; a worker that dies stops the others (the
    orchestrator restarts the pod). The workers are fresh processes (no fork after gRPC
    started: there is none in this one)."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("--workers needs SO_REUSEPORT (Linux, macOS)")
    argv = sys.argv[1:]
    if "gateway" not in argv:
        raise ValueError("--workers: run as `moshi-grpc gateway ...`")
    reserved = _reserve_port(args.host, args.port)
    port = reserved.getsockname()[1]
    procs: list[subprocess.Popen] = []
    for i in range(args.workers):
        extra = ["--port", str(port), "--workers", str(args.workers), "--worker-index", str(i)]
        if args.metrics_port > 0:
            extra += ["--metrics-port", str(args.metrics_port + i)]
        cmd = [sys.executable, "-m", "moshi_grpc.cli", *argv, *extra]
        procs.append(subprocess.Popen(cmd))
    log.info("gateway: %d workers on %s:%d", args.workers, args.host, port)
    stopping = False

    def forward(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = 0
    try:
        while any(p.poll() is None for p in procs):
            for p in procs:
                code = p.poll()
                if code is not None and code != 0 and not stopping:
                    log.error("gateway worker exited with %d; stopping the others", code)
                    rc = code
                    forward(signal.SIGTERM, None)
            time.sleep(0.2)
    finally:
        reserved.close()
    codes = [p.returncode for p in procs]
    return rc or max((c for c in codes if c is not None), default=0)


def run(args: argparse.Namespace) -> int:
    logs.install(json_logs=args.json_logs)
    try:
        if args.workers < 1:
            raise ValueError("--workers must be >= 1")
        if args.workers > 1 and args.worker_index is None:
            return _supervise(args)
        tracing.setup_from_args(args, "gateway")  # (each worker exports its own spans)
        return asyncio.run(_serve(args))
    except (ReplicaSpecError, ValueError, OSError) as exc:
        log.error("gateway: %s", exc)
        return 2
    finally:
        tracing.shutdown()  # flushes the spans still batched
