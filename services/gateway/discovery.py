"""Backend discovery: replica addresses (static lists, DNS), channels (TLS, bearer token), and
the health and load probes that keep every replica's view fresh.

A replica *spec* is either `host:port` (one replica; gRPC resolves the host itself) or
`dns:///host:port` (every address the name resolves to is a replica: the Kubernetes headless
service pattern). DNS specs are re-resolved every refresh with `getaddrinfo`, so pods that
come and go are picked up; replicas that disappear from DNS take no new sessions and are
closed once no session is pinned to them. Every refresh also asks each replica for its health
(grpc.health.v1) and its `Info` (slots total/in use, per-bucket step times, draining).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moshi_grpc.services.gateway.config import CostSettings
from moshi_grpc.services.gateway.cost import ReplicaCost
from moshi_grpc.services.gateway.pipeline import Backend
from moshi_grpc.services.gateway.replicas import Replica
from moshi_grpc.v1 import common_pb2

log = logging.getLogger(__name__)


class ReplicaSpecError(ValueError):
    """A replica address that cannot be parsed."""


@dataclass(frozen=True)
class Spec:
    """One configured replica source."""

    host: str
    port: int
    dns: bool  # True: expand to every resolved address

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_spec(text: str) -> Spec:
    """Parse `host:port`, `[v6]:port` or `dns:///host:port` (also `dns:host:port`)."""
    raw = text.strip()
    dns = False
    if raw.startswith("dns:"):
        dns = True
        raw = raw[4:]
        if raw.startswith("//"):
            raw = raw[2:]
            # dns://authority/host:port: the authority (DNS server) is not supported; skip it.
            slash = raw.find("/")
            raw = raw[slash + 1 :] if slash >= 0 else raw
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0 or raw[end + 1 : end + 2] != ":":
            raise ReplicaSpecError(f"bad replica address {text!r}: expected [v6-address]:port")
        host, port_text = raw[1:end], raw[end + 2 :]
    else:
        host, sep, port_text = raw.rpartition(":")
        if not sep:
            raise ReplicaSpecError(f"bad replica address {text!r}: expected host:port")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ReplicaSpecError(f"bad replica address {text!r}: expected host:port")
    return Spec(host, int(port_text), dns)


def parse_specs(values: Sequence[str] | str) -> list[Spec]:
    """Comma-separated and/or repeated flag values -> specs (at least one)."""
    items = [values] if isinstance(values, str) else list(values)
    specs = [parse_spec(p) for item in items for p in item.split(",") if p.strip()]
    if not specs:
        raise ReplicaSpecError("no replica address given")
    return specs


@dataclass
class ChannelSettings:
    """How the gateway connects to backends: TLS roots, bearer token, channel options."""

    tls_ca: bytes | None = None
    auth_token: str | None = None
    options: tuple[tuple[str, object], ...] = ()
    # Client certificate for backends that require mTLS (PEM bytes; both or neither).
    tls_client_cert: bytes | None = None
    tls_client_key: bytes | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.auth_token}"),) if self.auth_token else ()

    def open(self, target: str) -> grpc.aio.Channel:
        options = list(self.options)
        if self.tls_ca is not None or self.tls_client_cert is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=self.tls_ca,
                private_key=self.tls_client_key,
                certificate_chain=self.tls_client_cert,
            )
            return grpc.aio.secure_channel(target, creds, options=options)
        return grpc.aio.insecure_channel(target, options=options)


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every TCP address `host` resolves to, as `ip:port` (IPv6 bracketed), sorted."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out = set()
    for family, _, _, _, sockaddr in infos:
        ip = sockaddr[0]
        out.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(out)


class ReplicaSet:
    """The replicas of one backend kind, kept fresh by `refresh()`."""

    def __init__(
        self,
        backend: Backend,
        specs: Sequence[Spec],
        channels: ChannelSettings,
        *,
        probe_timeout_s: float = 1.0,
        resolver=resolve_addresses,
        clock: Callable[[], float] = time.monotonic,
        cost: CostSettings | None = None,
    ) -> None:
        self.backend = backend
        self.specs = list(specs)
        self._channels = channels
        self._probe_timeout_s = probe_timeout_s
        self._resolver = resolver
        self.clock = clock
        self.cost = cost or CostSettings()
        self.replicas: dict[str, Replica] = {}

    async def _targets(self) -> list[str]:
        targets: list[str] = []
        for spec in self.specs:
            if not spec.dns:
                targets.append(spec.target)
                continue
            try:
                targets.extend(await self._resolver(spec.host, spec.port))
            except OSError as exc:
                log.warning("%s: cannot resolve %s: %s", self.backend.kind, spec.target, exc)
                # keep what we had for this name rather than dropping every replica
                targets.extend(a for a, r in self.replicas.items() if r.listed)
        return list(dict.fromkeys(targets))

    async def refresh(self) -> None:
        """Re-resolve names, then probe every replica's health and load concurrently."""
        kind = self.backend.kind
        targets = await self._targets()
        wanted = set(targets)
        for address in targets:
            if address not in self.replicas:
                self.replicas[address] = Replica(
                    self.backend,
                    address,
                    self._channels.open(address),
                    clock=self.clock,
                    cost=ReplicaCost(self.backend, self.cost),
                )
                log.info("%s replica added: %s", kind, address)
            self.replicas[address].listed = True
        for address, replica in list(self.replicas.items()):
            if address not in wanted:
                if replica.listed:
                    log.info("%s replica no longer listed: %s", kind, address)
                replica.listed = False
                if replica.local_sessions <= 0:
                    del self.replicas[address]
                    replica.close_streams()
                    await replica.channel.close()
        await asyncio.gather(*(self._probe(r) for r in self.replicas.values()))

    async def _probe(self, replica: Replica) -> None:
        md = self._channels.metadata()
        try:
            health = health_pb2_grpc.HealthStub(replica.channel)
            status = await health.Check(
                health_pb2.HealthCheckRequest(service=""),
                timeout=self._probe_timeout_s,
                metadata=md,
            )
            t0 = time.perf_counter()
            info = await replica.stub.Info(
                common_pb2.InfoRequest(), timeout=self._probe_timeout_s, metadata=md
            )
            rtt_ms = (time.perf_counter() - t0) * 1000.0
        except grpc.aio.AioRpcError as exc:
            replica.failures += 1
            if replica.healthy:
                log.warning(
                    "%s replica %s unhealthy: %s %s",
                    replica.kind,
                    replica.address,
                    exc.code().name,
                    exc.details(),
                )
            replica.healthy = False
            return
        replica.failures = 0
        serving = status.status == health_pb2.HealthCheckResponse.SERVING
        if serving != replica.healthy:
            state = "serving" if serving else "down"
            log.info("%s replica %s %s", replica.kind, replica.address, state)
        replica.healthy = serving
        replica.info = info
        replica.info_at = now = self.clock()
        replica.cost.update(info, now, rtt_ms)
        replica.forget_before(now)

    def healthy_count(self) -> int:
        return sum(1 for r in self.replicas.values() if r.healthy and r.listed)

    def available(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.available]

    async def close(self) -> None:
        for replica in self.replicas.values():
            replica.close_streams()
            await replica.channel.close()
        self.replicas.clear()


class ReplicaPool:
    """One replica set per backend kind (`sets`), refreshed in the background."""

    def __init__(
        self,
        specs: Mapping[Backend, Sequence[Spec]],
        channels: ChannelSettings,
        *,
        refresh_interval_s: float = 0.5,
        probe_timeout_s: float = 1.0,
        resolver=resolve_addresses,
        on_refresh: Callable[[ReplicaPool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        cost: CostSettings | None = None,
    ) -> None:
        self.channels = channels
        self.clock = clock
        kw = {"probe_timeout_s": probe_timeout_s, "resolver": resolver, "clock": clock}
        self.sets: dict[str, ReplicaSet] = {
            backend.kind: ReplicaSet(backend, s, channels, cost=cost, **kw)
            for backend, s in specs.items()
        }
        self.refresh_interval_s = refresh_interval_s
        self._on_refresh = on_refresh
        self._task: asyncio.Task | None = None

    async def refresh(self) -> None:
        await asyncio.gather(*(s.refresh() for s in self.sets.values()))
        if self._on_refresh is not None:
            self._on_refresh(self)

    async def start(self) -> None:
        """First refresh now (so the gateway knows its backends), then every interval."""
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="replica-pool-refresh")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep watching whatever went wrong this round
                log.exception("replica refresh failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for replica_set in self.sets.values():
            await replica_set.close()
