"""The grpc.aio server bootstrap shared by the codec, LM and gateway services.

What every service gets from `start_server(...)`:
- bind host:port (port 0 = ephemeral; `RunningServer.port` is the bound port), optional TLS
  (and mTLS with a client CA), message size limits, `maximum_concurrent_rpcs`, keepalive
  enforcement and `max_connection_age` (long streams rebalance behind L4 load balancers);
- grpc.health.v1 (aio servicer) for "" and every service name: NOT_SERVING until
  `set_serving()` (model loading) and again from the start of a drain;
- server reflection; the interceptors of `interceptors.py`: bearer-token auth (health
  exempt, so probes work) and serving (admission, error mapping, RPC metrics, in-flight
  accounting for the drain, log context);
- `/metrics` over HTTP from the server's own registry (port 0 = ephemeral);
- graceful drain: NOT_SERVING -> refuse new streams -> let live streams finish up to the
  grace period -> stop (SIGTERM/SIGINT trigger it through `install_signal_handlers`).

In-process use (tests, `moshi-grpc up`)::

    async with serve(config, [Service("moshi_grpc.v1.Codec", register)], "codec") as srv:
        channel = grpc.aio.insecure_channel(srv.address)
        ...

Nothing relies on `finally` blocks running after `stop(grace)` (grpc/grpc#37239): callers
free per-stream resources with `context.add_done_callback` as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from moshi_grpc import __version__
from moshi_grpc.services.common.interceptors import AuthInterceptor, ServingInterceptor
from moshi_grpc.services.common.metrics import (
    MetricsHttpServer,
    RpcMetrics,
    ServerMetrics,
    new_registry,
    serve_metrics,
)

log = logging.getLogger(__name__)

AUTH_ENV = "MOSHI_GRPC_AUTH_TOKEN"


@dataclass
class ServerConfig:
    """Transport, limits and lifecycle settings of one server (flags.py fills it from the CLI)."""

    host: str = "127.0.0.1"
    port: int = 0
    metrics_host: str | None = None  # None: same as host
    metrics_port: int | None = 0  # None: no /metrics HTTP server
    max_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_rpcs: int | None = None
    grace_s: float = 10.0
    idle_timeout_s: float = 30.0
    # Clients may ping at most this often without data (enforced; more = GOAWAY).
    min_ping_interval_ms: int = 10_000
    keepalive_time_ms: int = 60_000
    keepalive_timeout_ms: int = 20_000
    max_connection_age_s: float | None = None
    max_connection_age_grace_s: float | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_token: str | None = None
    # Share the port with sibling processes (SO_REUSEPORT: `gateway --workers N`); off by
    # default so that a port already in use is an error.
    reuse_port: bool = False

    def grpc_options(self) -> list[tuple[str, int]]:
        opts = [
            ("grpc.max_receive_message_length", int(self.max_message_bytes)),
            ("grpc.max_send_message_length", int(self.max_message_bytes)),
            ("grpc.so_reuseport", 1 if self.reuse_port else 0),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_ms)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_ms)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.min_ping_interval_ms)),
            ("grpc.http2.max_ping_strikes", 2),
        ]
        if self.max_connection_age_s:
            opts.append(("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)))
            grace = self.max_connection_age_grace_s
            if grace is None:
                grace = self.grace_s
            opts.append(("grpc.max_connection_age_grace_ms", int(grace * 1000)))
        return opts


@dataclass
class Service:
    """A servicer to add: its full proto name (for health and reflection) and the
    generated `add_*Servicer_to_server` call bound to the servicer."""

    name: str
    register: Callable[[grpc.aio.Server], None]


@dataclass
class ServerState:
    """Lifecycle flags that servicers read (Info's `draining`) and the interceptor enforces."""

    ready: bool = False
    draining: bool = False
    inflight: int = 0
    _idle: asyncio.Event | None = field(default=None, repr=False)

    def _event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            if self.inflight == 0:
                self._idle.set()
        return self._idle

    def enter(self) -> None:
        self.inflight += 1
        self._event().clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight <= 0:
            self.inflight = 0
            self._event().set()

    async def wait_idle(self) -> None:
        await self._event().wait()


def read_pem(path: str | None, flag: str) -> bytes | None:
    """The bytes of the PEM file a flag names (None when unset); ValueError naming the flag
    when there is no such file."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{flag} file not found: {path}")
    return p.read_bytes()


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not (config.tls_cert or config.tls_key or config.tls_client_ca):
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    cert = read_pem(config.tls_cert, "--tls-cert")
    key = read_pem(config.tls_key, "--tls-key")
    ca = read_pem(config.tls_client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


class RunningServer:
    """A started server: bound ports, health control, drain and stop."""

    def __init__(
        self,
        server: grpc.aio.Server,
        *,
        config: ServerConfig,
        service_name: str,
        service_names: list[str],
        port: int,
        health_servicer: health.aio.HealthServicer,
        registry: CollectorRegistry,
        state: ServerState,
        server_metrics: ServerMetrics,
        metrics_http: MetricsHttpServer | None,
        tls: bool,
    ) -> None:
        self.server = server
        self.config = config
        self.service_name = service_name
        self.service_names = service_names
        self.port = port
        self.health = health_servicer
        self.registry = registry
        self.state = state
        self.server_metrics = server_metrics
        self._metrics_http = metrics_http
        self.tls = tls
        self._on_stop: list[Callable[[], object]] = []
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Task | None = None
        # Completes once the model is loaded (set by start_backend); None: ready at start.
        self.ready: asyncio.Future | None = None
        # Whatever the service wants tests and `up` to reach (its servicer, engine...).
        self.servicer: object | None = None

    @property
    def address(self) -> str:
        """host:port to dial (loopback when bound to a wildcard address)."""
        host = self.config.host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_http.port if self._metrics_http else None

    @property
    def metrics_url(self) -> str | None:
        if self._metrics_http is None:
            return None
        host = self._metrics_http.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self._metrics_http.port}/metrics"

    @property
    def draining(self) -> bool:
        return self.state.draining

    def on_stop(self, callback: Callable[[], object]) -> None:
        """Run `callback` (sync or async) after the gRPC server stopped (e.g. free the model)."""
        self._on_stop.append(callback)

    async def set_serving(self, serving: bool = True) -> None:
        """Mark the model loaded (SERVING, streams admitted) or not (NOT_SERVING)."""
        if self.state.draining:
            return
        self.state.ready = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)
        self.server_metrics.ready.labels(self.service_name).set(1 if serving else 0)
        log.info("%s %s", self.service_name, "serving" if serving else "not serving")

    async def drain(self, grace_s: float | None = None) -> None:
        """NOT_SERVING -> refuse new streams -> wait for live ones up to grace -> stop."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._drain(grace_s))
        await asyncio.shield(self._stopping)

    async def _drain(self, grace_s: float | None) -> None:
        grace = self.config.grace_s if grace_s is None else grace_s
        self.state.draining = True
        self.server_metrics.draining.labels(self.service_name).set(1)
        await self.health.enter_graceful_shutdown()
        log.info(
            "%s draining: %d live stream(s), grace %.1fs",
            self.service_name,
            self.state.inflight,
            grace,
        )
        t0 = time.monotonic()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.state.wait_idle(), timeout=max(grace, 0.0))
        left = max(0.0, grace - (time.monotonic() - t0))
        if self.state.inflight:
            log.warning(
                "%s grace period over: cancelling %d live stream(s)",
                self.service_name,
                self.state.inflight,
            )
        await self._stop(min(left, 1.0))

    async def stop(self, grace_s: float | None = 0.0) -> None:
        """Stop now (live streams get CANCELLED after `grace_s`), without a drain."""
        if self._stopping is None:
            self.state.draining = True
            self._stopping = asyncio.ensure_future(self._stop(grace_s))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace_s: float | None) -> None:
        try:
            await self.server.stop(grace_s)
        finally:
            for callback in self._on_stop:
                try:
                    result = callback()
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("shutdown callback failed")
            if self._metrics_http is not None:
                self._metrics_http.close()
            self._stopped.set()
            log.info("%s stopped", self.service_name)

    async def wait_closed(self) -> None:
        await self._stopped.wait()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT -> drain (a second signal stops at once)."""
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if self._stopping is None:
                log.info("signal %d: draining", signum)
                asyncio.ensure_future(self.drain())
            else:
                log.info("signal %d again: stopping now", signum)
                asyncio.ensure_future(self.server.stop(0))

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_signal, sig)


async def start_server(
    config: ServerConfig,
    services: Sequence[Service],
    service_name: str,
    *,
    registry: CollectorRegistry | None = None,
    state: ServerState | None = None,
    ready: bool = True,
) -> RunningServer:
    """Build, bind and start a server; `ready=False` keeps it NOT_SERVING until
    `set_serving()` (call that once the model is loaded)."""
    registry = registry if registry is not None else new_registry()
    state = state if state is not None else ServerState()
    rpc_metrics = RpcMetrics.create(registry)
    server_metrics = ServerMetrics.create(registry, service_name)
    token = config.auth_token
    interceptors: list[grpc.aio.ServerInterceptor] = [ServingInterceptor(state, rpc_metrics)]
    if token:
        interceptors.append(AuthInterceptor(token))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=config.grpc_options(),
        maximum_concurrent_rpcs=config.max_concurrent_rpcs or None,
    )
    for svc in services:
        svc.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [svc.name for svc in services]
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    creds = _credentials(config)
    address = f"{config.host}:{config.port}"
    try:
        if creds is not None:
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot bind gRPC server to {address}: {exc}") from exc
    if not port:
        raise OSError(f"cannot bind gRPC server to {address}")
    metrics_http = None
    if config.metrics_port is not None:
        metrics_http = serve_metrics(
            registry, config.metrics_host or config.host, int(config.metrics_port)
        )
    try:
        await server.start()
    except BaseException:
        if metrics_http is not None:
            metrics_http.close()
        raise
    running = RunningServer(
        server,
        config=config,
        service_name=service_name,
        service_names=names,
        port=port,
        health_servicer=health_servicer,
        registry=registry,
        state=state,
        server_metrics=server_metrics,
        metrics_http=metrics_http,
        tls=creds is not None,
    )
    log.info(
        "%s: gRPC bound to %s:%d (%s, auth %s)",
        service_name,
        config.host,
        port,
        "TLS" if creds is not None else "plaintext",
        "on" if token else "off",
    )
    if ready:
        await running.set_serving(True)
    return running


@contextlib.asynccontextmanager
async def serve(
    config: ServerConfig,
    services: Sequence[Service],
    service_name: str,
    **kwargs,
) -> AsyncIterator[RunningServer]:
    """`start_server` as a context manager; stops the server (grace 0) on exit."""
    running = await start_server(config, services, service_name, **kwargs)
    try:
        yield running
    finally:
        await running.stop(0)


def version() -> str:
    return __version__
