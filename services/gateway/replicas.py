"""Backend replicas: discovery (static lists, DNS), health and load watching, least-loaded pick.

A replica *spec* is either `host:port` (one replica; gRPC resolves the host itself) or
`dns:///host:port` (every address the name resolves to is a replica: the Kubernetes headless
service pattern). DNS specs are re-resolved every refresh with `getaddrinfo`, so pods that
come and go are picked up; replicas that disappear from DNS take no new sessions and are
closed once no session is pinned to them.

Every refresh also asks each replica for its health (grpc.health.v1) and its `Info` (slots
total/in use, step-time p99, draining). Between refreshes the gateway counts the sessions it
placed itself, so a burst of new sessions does not pile onto the replica that looked emptiest
at the last poll.

The pool is transport-light on purpose: `Replica` holds one shared channel per address;
sessions open their own streams on it, or share its multiplexed streams (`Replica.mux`,
see gateway/streams.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moshi_grpc.services.common.errors import CapacityExhausted
from moshi_grpc.v1 import codec_pb2_grpc, common_pb2, lm_pb2_grpc

log = logging.getLogger(__name__)

CODEC = "codec"
LM = "lm"

# Slots one session takes in each kind of replica's Info: the codec reports slots per stage
# (a session holds one Encode and one Decode slot; `slots_in_use` is the busier stage) and
# its step p50/p99 as encode + decode, so one session = one slot = one step time each.
SLOTS_PER_SESSION = {CODEC: 1, LM: 1}


class NoCapacity(CapacityExhausted):
    """No replica can take a new session now; `reason` is the metric label, `retry_after_ms`
    the hint given to the client."""

    def __init__(self, message: str, reason: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_ms = retry_after_ms
        if reason == "backend_unavailable":
            self.code = grpc.StatusCode.UNAVAILABLE


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


@dataclass
class Replica:
    """One backend address with its shared channel and the latest view of its load."""

    kind: str
    address: str
    channel: grpc.aio.Channel
    healthy: bool = False
    info: common_pb2.BackendInfo | None = None
    info_at: float = 0.0
    # Sessions this gateway pinned here now, and when recent ones were placed (those placed
    # after the last Info answer cannot be in its slots_in_use yet).
    local_sessions: int = 0
    recent_leases: deque = field(default_factory=deque)
    listed: bool = True  # False once DNS stopped returning it
    failures: int = 0
    stub: object = field(default=None, repr=False)
    # The shared multiplexed streams to this replica, by stage name (gateway/streams.py).
    mux: dict = field(default_factory=dict, repr=False)

    def close_streams(self) -> None:
        """Cancel this replica's multiplexed streams (it is being forgotten)."""
        for stream in self.mux.values():
            stream.close()
        self.mux.clear()

    def __post_init__(self) -> None:
        if self.stub is None:
            cls = codec_pb2_grpc.CodecStub if self.kind == CODEC else lm_pb2_grpc.LMStub
            self.stub = cls(self.channel)

    @property
    def slots_total(self) -> int:
        return self.info.slots_total if self.info else 0

    @property
    def slots_used(self) -> int:
        """Slots in use: the last Info's count plus the sessions placed since that answer,
        and never less than this gateway's own live sessions.

        Sessions placed while an Info request was in flight may or may not be in its count;
        the floor covers them for this gateway without counting them twice. (Another
        gateway's sessions in that window can be missed until the next poll; a backend
        that is full after all refuses the stream itself, which the client sees as
        RESOURCE_EXHAUSTED with a retry hint.)
        """
        per = SLOTS_PER_SESSION[self.kind]
        if self.info is None:
            return self.local_sessions * per
        newer = sum(1 for t in self.recent_leases if t > self.info_at)
        return max(self.info.slots_in_use + newer * per, self.local_sessions * per)

    def placed(self) -> None:
        """Count a session placed here (until `released`)."""
        self.local_sessions += 1
        self.recent_leases.append(time.monotonic())

    def released(self) -> None:
        """Count a session gone. A session placed after the last Info answer and gone before
        the next one was never in the backend's count: forget its lease too, or a burst of
        short sessions would look like a full replica until the next poll."""
        self.local_sessions -= 1
        if self.recent_leases and self.recent_leases[-1] > self.info_at:
            self.recent_leases.pop()

    @property
    def free_slots(self) -> int:
        return self.slots_total - self.slots_used

    @property
    def load(self) -> float:
        total = self.slots_total
        return self.slots_used / total if total else 1.0

    @property
    def step_p99_ms(self) -> float:
        return self.info.step_p99_ms if self.info else 0.0

    @property
    def available(self) -> bool:
        return (
            self.healthy
            and self.listed
            and self.info is not None
            and not self.info.draining
            and self.free_slots >= SLOTS_PER_SESSION[self.kind]
        )


@dataclass
class Lease:
    """A session's pinned replicas; `release()` is idempotent."""

    codec: Replica
    lm: Replica
    _released: bool = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.codec.released()
            self.lm.released()

    def move_lm(self, replica: Replica) -> None:
        """LM failover: the session's LM slot is now on `replica`."""
        if not self._released:
            self.lm.released()
            replica.placed()
        self.lm = replica


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
    """The replicas of one kind (codec or LM), kept fresh by `refresh()`."""

    def __init__(
        self,
        kind: str,
        specs: Sequence[Spec],
        channels: ChannelSettings,
        *,
        probe_timeout_s: float = 1.0,
        resolver=resolve_addresses,
    ) -> None:
        self.kind = kind
        self.specs = list(specs)
        self._channels = channels
        self._probe_timeout_s = probe_timeout_s
        self._resolver = resolver
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
                log.warning("%s: cannot resolve %s: %s", self.kind, spec.target, exc)
                # keep what we had for this name rather than dropping every replica
                targets.extend(a for a, r in self.replicas.items() if r.listed)
        return list(dict.fromkeys(targets))

    async def refresh(self) -> None:
        """Re-resolve names, then probe every replica's health and load concurrently."""
        targets = await self._targets()
        wanted = set(targets)
        for address in targets:
            if address not in self.replicas:
                self.replicas[address] = Replica(self.kind, address, self._channels.open(address))
                log.info("%s replica added: %s", self.kind, address)
            self.replicas[address].listed = True
        for address, replica in list(self.replicas.items()):
            if address not in wanted:
                if replica.listed:
                    log.info("%s replica no longer listed: %s", self.kind, address)
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
            info = await replica.stub.Info(
                common_pb2.InfoRequest(), timeout=self._probe_timeout_s, metadata=md
            )
        except grpc.aio.AioRpcError as exc:
            replica.failures += 1
            if replica.healthy:
                log.warning(
                    "%s replica %s unhealthy: %s %s",
                    self.kind,
                    replica.address,
                    exc.code().name,
                    exc.details(),
                )
            replica.healthy = False
            return
        replica.failures = 0
        serving = status.status == health_pb2.HealthCheckResponse.SERVING
        if serving != replica.healthy:
            log.info(
                "%s replica %s %s", self.kind, replica.address, "serving" if serving else "down"
            )
        replica.healthy = serving
        replica.info = info
        replica.info_at = now = time.monotonic()
        leases = replica.recent_leases
        while leases and leases[0] <= now:
            leases.popleft()

    def healthy_count(self) -> int:
        return sum(1 for r in self.replicas.values() if r.healthy and r.listed)

    def choose(self, budget_ms: float, frame_estimate_ms: Callable[[Replica], float]) -> Replica:
        """Least-loaded available replica whose recent step times fit the budget."""
        candidates = [r for r in self.replicas.values() if r.available]
        if not candidates:
            if not any(r.healthy for r in self.replicas.values()):
                raise NoCapacity(
                    f"no healthy {self.kind} replica", "backend_unavailable", retry_after_ms=1000
                )
            raise NoCapacity(
                f"no {self.kind} replica has a free slot", "capacity", retry_after_ms=1000
            )
        fitting = [r for r in candidates if frame_estimate_ms(r) <= budget_ms]
        if not fitting:
            best = min(frame_estimate_ms(r) for r in candidates)
            raise NoCapacity(
                f"recent {self.kind} step times (~{best:.0f} ms per frame) cannot meet the "
                f"{budget_ms:.0f} ms budget",
                "budget",
                retry_after_ms=2000,
            )
        return min(fitting, key=lambda r: (r.load, r.step_p99_ms, r.address))

    async def close(self) -> None:
        for replica in self.replicas.values():
            replica.close_streams()
            await replica.channel.close()
        self.replicas.clear()


class ReplicaPool:
    """Codec and LM replica sets, refreshed in the background; hands out `Lease`s."""

    def __init__(
        self,
        codec_specs: Sequence[Spec],
        lm_specs: Sequence[Spec],
        channels: ChannelSettings,
        *,
        refresh_interval_s: float = 0.5,
        probe_timeout_s: float = 1.0,
        resolver=resolve_addresses,
        on_refresh: Callable[[ReplicaPool], None] | None = None,
    ) -> None:
        self.channels = channels
        self.codec = ReplicaSet(
            CODEC, codec_specs, channels, probe_timeout_s=probe_timeout_s, resolver=resolver
        )
        self.lm = ReplicaSet(
            LM, lm_specs, channels, probe_timeout_s=probe_timeout_s, resolver=resolver
        )
        self.refresh_interval_s = refresh_interval_s
        self._on_refresh = on_refresh
        self._task: asyncio.Task | None = None

    async def refresh(self) -> None:
        await asyncio.gather(self.codec.refresh(), self.lm.refresh())
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
        await self.codec.close()
        await self.lm.close()

    def failover_lm(self, failed: Replica) -> Replica | None:
        """Least-loaded other LM replica with a free slot for a session moving off `failed`,
        or None. No budget check: the session is already running; moving beats ending it."""
        candidates = [r for r in self.lm.replicas.values() if r is not failed and r.available]
        if not candidates:
            return None
        return min(candidates, key=lambda r: (r.load, r.step_p99_ms, r.address))

    def lease(self, budget_ms: float) -> Lease:
        """Pin a new session to the least-loaded codec and LM replicas, or raise NoCapacity.

        The budget check uses the replicas' recent step p99: the codec's (encode + decode,
        as its Info reports it) plus the LM's must fit in the per-frame budget.
        """
        lm = self.lm.choose(budget_ms, lambda r: r.step_p99_ms)
        lm_ms = lm.step_p99_ms
        codec = self.codec.choose(budget_ms, lambda r: r.step_p99_ms + lm_ms)
        codec.placed()
        lm.placed()
        return Lease(codec, lm)
