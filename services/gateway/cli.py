"""`moshi-grpc gateway`: the session gateway (public Converse API).

`start_gateway(...)` starts the Moshi pipeline's gateway in-process (tests, benchmarks),
`start_pipeline(...)` any pipeline's; `run(args)` is the console entry point: serve until
SIGTERM/SIGINT, then drain.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
from collections.abc import Mapping, Sequence

from moshi_grpc.services.common import flags as common_flags
from moshi_grpc.services.common import logs, tracing
from moshi_grpc.services.common.metrics import GatewayMetrics, new_registry
from moshi_grpc.services.common.server import (
    RunningServer,
    ServerConfig,
    ServerState,
    Service,
    start_server,
)
from moshi_grpc.services.gateway import workers
from moshi_grpc.services.gateway.admission import Admission
from moshi_grpc.services.gateway.config import GatewaySettings
from moshi_grpc.services.gateway.discovery import (
    ChannelSettings,
    ReplicaPool,
    ReplicaSpecError,
    Spec,
    parse_specs,
)
from moshi_grpc.services.gateway.flags import (
    BACKEND_CHANNEL_OPTIONS,
    add_gateway_flags,
    channels_from_args,
    settings_from_args,
)
from moshi_grpc.services.gateway.moshi_pipeline import CODEC, LM, MOSHI
from moshi_grpc.services.gateway.persona import Personas
from moshi_grpc.services.gateway.pipeline import Pipeline
from moshi_grpc.services.gateway.servicer import GatewayServicer
from moshi_grpc.services.gateway.streams import MODES
from moshi_grpc.services.gateway.voices import VoiceDirectory
from moshi_grpc.v1 import gateway_pb2_grpc

__all__ = ["add_arguments", "run", "settings_from_args", "start_gateway", "start_pipeline"]

log = logging.getLogger(__name__)

SERVICE_NAME = "moshi_grpc.v1.Gateway"
# A longer coalescing window would spend a large part of a frame's budget per stage.
MAX_MUX_COALESCE_MS = 20.0
# Allocations between young-generation collections (CPython's default: 700).
GC_THRESHOLD0 = 10_000

Addresses = Sequence[Spec] | Sequence[str] | str


class GatewayServer:
    """A started gateway: the common `RunningServer` plus its pool, admission and servicer."""

    def __init__(self, server: RunningServer, admission: Admission, servicer: GatewayServicer):
        self.server = server
        self.admission = admission
        self.pool = admission.pool
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


def _check(settings: GatewaySettings) -> None:
    if settings.backend_streams not in MODES:
        raise ValueError(
            f"backend_streams must be one of {', '.join(MODES)}, got {settings.backend_streams!r}"
        )
    if not 0.0 <= settings.mux_coalesce_ms <= MAX_MUX_COALESCE_MS:
        raise ValueError(
            f"mux_coalesce_ms must be within 0..{MAX_MUX_COALESCE_MS:g}, "
            f"got {settings.mux_coalesce_ms!r}"
        )


async def start_pipeline(
    config: ServerConfig,
    pipeline: Pipeline,
    addresses: Mapping[str, Addresses],
    settings: GatewaySettings | None = None,
    channels: ChannelSettings | None = None,
    *,
    resolver=None,
) -> GatewayServer:
    """Start a gateway for `pipeline` in this event loop, with `addresses` (specs or their
    text) per backend kind; backends are probed once before it serves."""
    settings = settings or GatewaySettings()
    _check(settings)
    # The voices are read and prepared before anything starts: a bad file stops the start.
    voices = await asyncio.to_thread(VoiceDirectory.load, settings.voice_dir, settings.max_voice_s)
    channels = channels or ChannelSettings(options=BACKEND_CHANNEL_OPTIONS)
    specs = {}
    for backend in pipeline.backends:
        given = addresses[backend.kind]
        specs[backend] = given if given and isinstance(given[0], Spec) else parse_specs(given)
    registry = new_registry()
    metrics = GatewayMetrics.create(registry)

    def on_refresh(pool: ReplicaPool) -> None:
        for kind, replica_set in pool.sets.items():
            metrics.backends_healthy.labels(kind).set(replica_set.healthy_count())

    extra = {"resolver": resolver} if resolver is not None else {}
    pool = ReplicaPool(
        specs,
        channels,
        refresh_interval_s=settings.refresh_interval_s,
        probe_timeout_s=settings.probe_timeout_s,
        on_refresh=on_refresh,
        cost=settings.cost,
        **extra,
    )
    await pool.start()
    admission = Admission(pool, pipeline, settings.cost, settings.retry_after_ms)
    state = ServerState()
    personas = Personas.of(settings, metrics, voices)
    servicer = GatewayServicer(admission, settings, metrics, state, personas)
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
    return GatewayServer(server, admission, servicer)


async def start_gateway(
    config: ServerConfig,
    codec: Addresses,
    lm: Addresses,
    settings: GatewaySettings | None = None,
    channels: ChannelSettings | None = None,
    *,
    resolver=None,
) -> GatewayServer:
    """Start the Moshi pipeline's gateway (`start_pipeline` with its codec and LM replicas)."""
    addresses = {CODEC.kind: codec, LM.kind: lm}
    return await start_pipeline(config, MOSHI, addresses, settings, channels, resolver=resolver)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common_flags.add_server_flags(parser, "gateway")
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
    add_gateway_flags(parser, MOSHI)


async def _serve(args: argparse.Namespace) -> int:
    config = common_flags.server_config_from_args(args)
    if args.worker_index is not None:
        config.reuse_port = True
    addresses = {b.kind: parse_specs(getattr(args, f"{b.kind}_addr")) for b in MOSHI.backends}
    gateway = await start_pipeline(
        config, MOSHI, addresses, settings_from_args(args), channels_from_args(args)
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


def run(args: argparse.Namespace) -> int:
    logs.install(json_logs=args.json_logs)
    try:
        if args.workers < 1:
            raise ValueError("--workers must be >= 1")
        if args.workers > 1 and args.worker_index is None:
            return workers.supervise(args)
        tracing.setup_from_args(args, "gateway")  # (each worker exports its own spans)
        return asyncio.run(_serve(args))
    except (ReplicaSpecError, ValueError, OSError) as exc:
        log.error("gateway: %s", exc)
        return 2
    finally:
        tracing.shutdown()  # flushes the spans still batched
