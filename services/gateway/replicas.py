"""Backend replicas: discovery (static lists, DNS), health and load watching, least-loaded pick.

A replica *spec* is either `host:port` (one replica; gRPC resolves the host itself) or
`dns:///host:port` (every address the name resolves to is a replica: the Kubernetes headless
service pattern). DNS specs are re-resolved every refresh with `getaddrinfo`, so pods that
come and go are picked up; replicas that disappear from DNS take no new sessions and are
closed once no session is pinned to them.

Every refresh also asks each replica for its health (grpc.health.v1) and its `Info` (slots
total/in use, per-bucket step times, draining). Between refreshes the gateway counts the
sessions it placed itself, so a burst of new sessions does not pile onto the replica that
looked emptiest at the last poll.

Admission from measured cost (`ReplicaCost`, `ReplicaPool.estimate`): a new session's frame
latency is predicted as

    encode + decode (codec, at the bucket it would join) + 2 x LM step (its bucket: the step
    itself, and one tick of phase: a frame that arrives just after a tick started waits for
    it) + 3 x the batching wait (each stage's --max-wait-ms; `GatewaySettings.batch_wait_ms`)
    + network (the Info round trip, once per backend call: 2 to the codec, 1 to the LM).

The bucket is the smallest of the replica's ladder (1, 2, 4, ... capped at its slots) that
holds its sessions in use + 1. A stage's time at a bucket is the time-decayed mean of the
recent medians the replica reported for it (a sample is taken when the reported median or
count changed, i.e. steps ran there; weight halves every ttl/3; gone after ttl), else its
warm-up time scaled by how much slower the replica's other buckets run now than at warm-up.
A replica whose Info has no bucket timings yet (an older backend) is *unmeasured*: each of
its stages is assumed to cost `unmeasured_stage_ms` (default 10 ms: a fresh replica refuses
budgets below ~55 ms, admits the 200 ms default), or its reported step p50 when that changed
recently. The session is refused (RESOURCE_EXHAUSTED, reason "budget", trailing
`retry-after-ms`: when the recent samples will have expired) when the prediction exceeds its
budget on every replica with a free slot.

The pool is transport-light on purpose: `Replica` holds one shared channel per address;
sessions open their own streams on it, or share its multiplexed streams (`Replica.mux`,
see gateway/streams.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moshi_grpc.services.common.errors import CapacityExhausted, ErrorCode
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
            self.code = ErrorCode.UNAVAILABLE


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
class CostSettings:
    """How frame cost is predicted (see the module docstring)."""

    batch_wait_ms: float = 5.0
    unmeasured_stage_ms: float = 10.0
    sample_ttl_s: float = 30.0


def bucket_for(sessions: int, slots_total: int) -> int:
    """The smallest bucket of the ladder 1, 2, 4, ... (capped at `slots_total`) that holds
    `sessions` rows."""
    b = 1
    while b < sessions:
        b *= 2
    return min(b, slots_total) if slots_total > 0 else b


class _Samples:
    """Time-stamped values that decay (half-life ttl/3) and expire (after ttl)."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float) -> None:
        self.items.append((now, value))

    def prune(self, now: float, ttl: float) -> None:
        items = self.items
        while items and now - items[0][0] >= ttl:
            items.popleft()

    def mean(self, now: float, ttl: float) -> float | None:
        self.prune(now, ttl)
        if not self.items:
            return None
        half = ttl / 3.0
        total = weight = 0.0
        for t, v in self.items:
            w = 0.5 ** (max(0.0, now - t) / half)
            total += w * v
            weight += w
        return total / weight

    def expires_at(self, ttl: float) -> float | None:
        return self.items[-1][0] + ttl if self.items else None


class ReplicaCost:
    """What one replica's frames cost, from its Info: per (stage, bucket) warm-up times and
    recent samples that expire. `update` is called with every Info answer."""

    def __init__(self, kind: str, settings: CostSettings | None = None) -> None:
        self.kind = kind
        self.settings = settings or CostSettings()
        self.warm: dict[tuple[str, int], float] = {}
        self.recent: dict[tuple[str, int], _Samples] = {}
        self._last: dict[tuple[str, int], tuple[float, int]] = {}
        self.legacy = _Samples()  # step p50 of a replica without bucket timings
        self._legacy_last = 0.0
        self.rtt = _Samples()

    @property
    def measured(self) -> bool:
        return bool(self.warm)

    def update(self, info: common_pb2.BackendInfo, now: float, rtt_ms: float) -> None:
        if rtt_ms >= 0:
            self.rtt.add(now, rtt_ms)
        for b in info.buckets:
            key = (b.stage, b.batch_size)
            if b.warm_ms > 0:
                self.warm[key] = b.warm_ms
            state = (b.recent_p50_ms, b.recent_count)
            if b.recent_count > 0 and b.recent_p50_ms > 0 and self._last.get(key) != state:
                self.recent.setdefault(key, _Samples()).add(now, b.recent_p50_ms)
            self._last[key] = state
        if not info.buckets and info.step_p50_ms > 0 and info.step_p50_ms != self._legacy_last:
            self.legacy.add(now, info.step_p50_ms)
        self._legacy_last = info.step_p50_ms
        ttl = self.settings.sample_ttl_s
        for samples in self.recent.values():
            samples.prune(now, ttl)
        self.legacy.prune(now, ttl)
        self.rtt.prune(now, ttl)

    def _slowdown(self, stage: str, now: float) -> float:
        """How much slower than at warm-up this stage runs now (>= 1), over its buckets with
        recent samples."""
        ttl = self.settings.sample_ttl_s
        ratios = []
        for (st, b), samples in self.recent.items():
            warm = self.warm.get((st, b), 0.0)
            mean = samples.mean(now, ttl) if st == stage else None
            if mean is not None and warm > 0:
                ratios.append(mean / warm)
        return max(1.0, sum(ratios) / len(ratios)) if ratios else 1.0

    def stage_ms(self, stage: str, bucket: int, now: float, *, recent: bool = True) -> float:
        """Predicted time of one `stage` step at `bucket` rows (recent=False: as if idle,
        from warm-up times only)."""
        ttl = self.settings.sample_ttl_s
        if not self.measured:
            legacy = self.legacy.mean(now, ttl) if recent else None
            if legacy is None:
                return self.settings.unmeasured_stage_ms
            # The codec's step p50 is encode + decode together.
            return legacy / 2.0 if self.kind == CODEC else legacy
        ladder = sorted(b for (st, b) in self.warm if st == stage)
        if not ladder:
            return self.settings.unmeasured_stage_ms
        fits = [b for b in ladder if b >= bucket]
        b = fits[0] if fits else ladder[-1]
        scale = 1.0 if fits else bucket / ladder[-1]
        if recent:
            samples = self.recent.get((stage, b))
            mean = samples.mean(now, ttl) if samples is not None else None
            if mean is not None:
                return mean * scale
            return self.warm[(stage, b)] * scale * self._slowdown(stage, now)
        return self.warm[(stage, b)] * scale

    def rtt_ms(self, now: float) -> float:
        mean = self.rtt.mean(now, self.settings.sample_ttl_s)
        return 0.0 if mean is None else mean

    def recent_expire_at(self) -> float | None:
        """When the last recent sample expires (the estimate is back to warm-up times)."""
        ttl = self.settings.sample_ttl_s
        times = [s.expires_at(ttl) for s in (*self.recent.values(), self.legacy)]
        times = [t for t in times if t is not None]
        return max(times) if times else None


@dataclass
class Estimate:
    """A predicted frame latency and its parts, milliseconds."""

    total_ms: float
    encode_ms: float = 0.0
    step_ms: float = 0.0
    decode_ms: float = 0.0
    wait_ms: float = 0.0
    phase_ms: float = 0.0
    network_ms: float = 0.0
    codec_bucket: int = 0
    lm_bucket: int = 0

    def describe(self) -> str:
        return (
            f"~{self.total_ms:.1f} ms per frame: encode {self.encode_ms:.1f} + step "
            f"{self.step_ms:.1f} + decode {self.decode_ms:.1f} (buckets codec "
            f"{self.codec_bucket}, lm {self.lm_bucket}) + batching wait {self.wait_ms:.1f} + "
            f"one tick {self.phase_ms:.1f} + network {self.network_ms:.1f}"
        )


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
    # after the last Info answer cannot be in its slots_in_use yet) or left (those that left
    # after it are still in its count).
    local_sessions: int = 0
    recent_leases: deque = field(default_factory=deque)
    recent_releases: deque = field(default_factory=deque)
    listed: bool = True  # False once DNS stopped returning it
    failures: int = 0
    stub: object = field(default=None, repr=False)
    # The shared multiplexed streams to this replica, by stage name (gateway/streams.py).
    mux: dict = field(default_factory=dict, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    cost: ReplicaCost | None = field(default=None, repr=False)

    def close_streams(self) -> None:
        """Cancel this replica's multiplexed streams (it is being forgotten)."""
        for stream in self.mux.values():
            stream.close()
        self.mux.clear()

    def __post_init__(self) -> None:
        if self.cost is None:
            self.cost = ReplicaCost(self.kind)
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
        gone = sum(1 for t in self.recent_releases if t > self.info_at)
        return max(self.info.slots_in_use + (newer - gone) * per, self.local_sessions * per)

    def placed(self) -> None:
        """Count a session placed here (until `released`)."""
        self.local_sessions += 1
        self.recent_leases.append(self.clock())

    def released(self) -> None:
        """Count a session gone. A session placed after the last Info answer and gone before
        the next one was never in the backend's count: forget its lease too, or a burst of
        short sessions would look like a full replica until the next poll. One placed
        before it is in that count until the next answer: remember that it left, or the
        next session would be predicted a bucket too high (back-to-back sessions of one
        client were refused for a stale slot)."""
        self.local_sessions -= 1
        if self.recent_leases and self.recent_leases[-1] > self.info_at:
            self.recent_leases.pop()
        else:
            self.recent_releases.append(self.clock())

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
        clock: Callable[[], float] = time.monotonic,
        cost: CostSettings | None = None,
    ) -> None:
        self.kind = kind
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
                self.replicas[address] = Replica(
                    self.kind,
                    address,
                    self._channels.open(address),
                    clock=self.clock,
                    cost=ReplicaCost(self.kind, self.cost),
                )
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
        replica.info_at = now = self.clock()
        replica.cost.update(info, now, rtt_ms)
        for recent in (replica.recent_leases, replica.recent_releases):
            while recent and recent[0] <= now:
                recent.popleft()

    def healthy_count(self) -> int:
        return sum(1 for r in self.replicas.values() if r.healthy and r.listed)

    def available(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.available]

    def choose(
        self,
        budget_ms: float,
        frame_estimate_ms: Callable[[Replica], float],
        describe: Callable[[Replica], str] | None = None,
        retry_after_ms: Callable[[], int] | None = None,
    ) -> Replica:
        """Least-loaded available replica whose predicted frame latency fits the budget."""
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
            best = min(candidates, key=frame_estimate_ms)
            what = describe(best) if describe else f"~{frame_estimate_ms(best):.0f} ms per frame"
            raise NoCapacity(
                f"predicted frame latency on the best {self.kind} replica {best.address} "
                f"({what}) cannot meet the {budget_ms:.0f} ms budget",
                "budget",
                retry_after_ms=retry_after_ms() if retry_after_ms else 2000,
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
        clock: Callable[[], float] = time.monotonic,
        cost: CostSettings | None = None,
        retry_after_ms: int = 1000,
    ) -> None:
        self.channels = channels
        self.clock = clock
        self.cost = cost = cost or CostSettings()
        self.retry_after_ms = retry_after_ms
        kw = {"probe_timeout_s": probe_timeout_s, "resolver": resolver, "clock": clock}
        self.codec = ReplicaSet(CODEC, codec_specs, channels, cost=cost, **kw)
        self.lm = ReplicaSet(LM, lm_specs, channels, cost=cost, **kw)
        self.last_estimate: Estimate | None = None
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

    # ------------------------------------------------------------- admission from cost

    def _codec_part(self, r: Replica, now: float, *, idle: bool = False) -> Estimate:
        b = 1 if idle else bucket_for(r.slots_used + 1, r.slots_total)
        enc = r.cost.stage_ms("encode", b, now, recent=not idle)
        dec = r.cost.stage_ms("decode", b, now, recent=not idle)
        wait = 2 * self.cost.batch_wait_ms
        net = 2 * r.cost.rtt_ms(now)
        return Estimate(enc + dec + wait + net, enc, 0.0, dec, wait, 0.0, net, b, 0)

    def _lm_part(self, r: Replica, now: float, *, idle: bool = False) -> Estimate:
        b = 1 if idle else bucket_for(r.slots_used + 1, r.slots_total)
        step = r.cost.stage_ms("step", b, now, recent=not idle)
        wait = self.cost.batch_wait_ms
        net = r.cost.rtt_ms(now)
        # One tick of phase: the LM steps every live session together, so a frame that
        # arrives just after a tick started waits for that tick first.
        return Estimate(2 * step + wait + net, 0.0, step, 0.0, wait, step, net, 0, b)

    @staticmethod
    def _sum(c: Estimate, m: Estimate) -> Estimate:
        return Estimate(
            c.total_ms + m.total_ms,
            c.encode_ms,
            m.step_ms,
            c.decode_ms,
            c.wait_ms + m.wait_ms,
            m.phase_ms,
            c.network_ms + m.network_ms,
            c.codec_bucket,
            m.lm_bucket,
        )

    def estimate(self, codec: Replica, lm: Replica, *, idle: bool = False) -> Estimate:
        """Predicted frame latency of a new session on this pair (idle=True: as if both were
        empty and had no recent samples, from warm-up times)."""
        now = self.clock()
        return self._sum(self._codec_part(codec, now, idle=idle), self._lm_part(lm, now, idle=idle))

    def _budget_retry_ms(self, budget_ms: float, codec: list[Replica], lm: list[Replica]):
        """Retry hint for a budget refusal: when the recent samples that push the prediction
        over the budget will have expired, if an idle pair could meet it; else the default."""

        def hint() -> int:
            now = self.clock()
            idle_fits = any(
                self.estimate(c, m, idle=True).total_ms <= budget_ms for c in codec for m in lm
            )
            expiry = [r.cost.recent_expire_at() for r in (*codec, *lm)]
            expiry = [t for t in expiry if t is not None and t > now]
            if not idle_fits or not expiry:
                return self.retry_after_ms
            return max(self.retry_after_ms, math.ceil((max(expiry) - now) * 1000.0))

        return hint

    def lease(self, budget_ms: float) -> Lease:
        """Pin a new session to the least-loaded codec and LM replicas whose predicted frame
        latency (module docstring) fits the budget, or raise NoCapacity."""
        now = self.clock()
        codecs = self.codec.available()
        lms = self.lm.available()
        best_codec = min(
            (self._codec_part(r, now) for r in codecs),
            key=lambda e: e.total_ms,
            default=Estimate(0.0),
        )
        retry = self._budget_retry_ms(budget_ms, codecs, lms)
        lm = self.lm.choose(
            budget_ms,
            lambda r: self._lm_part(r, now).total_ms + best_codec.total_ms,
            lambda r: self._sum(best_codec, self._lm_part(r, now)).describe(),
            retry,
        )
        lm_part = self._lm_part(lm, now)
        codec = self.codec.choose(
            budget_ms,
            lambda r: self._codec_part(r, now).total_ms + lm_part.total_ms,
            lambda r: self._sum(self._codec_part(r, now), lm_part).describe(),
            retry,
        )
        self.last_estimate = self._sum(self._codec_part(codec, now), lm_part)
        codec.placed()
        lm.placed()
        return Lease(codec, lm)
