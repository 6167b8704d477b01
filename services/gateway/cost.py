"""The cost model: what a new session's frames would cost on a set of replicas.

A frame's predicted latency is the sum over the pipeline's stages of

    the stage's step time (at the bucket the session would join on its replica)
    + one more step for a stage that runs in phase (`Stage.phase`, the LM: it steps every
      live session together, so a frame that arrives just after a tick started waits for it)
    + the batching wait (each backend's --max-wait-ms; `CostSettings.batch_wait_ms`)
    + the network (the replica's Info round trip, once per backend call)

(the Moshi pipeline: encode + decode + 2 x step + 3 x the batching wait + 3 round trips).

A stage's time at a bucket is the time-decayed mean of the recent medians its replica reported
for it (a sample is taken when the reported median or count changed, i.e. steps ran there;
weight halves every ttl/3; gone after ttl), else its warm-up time scaled by how much slower
the replica's other buckets run now than at warm-up. A replica whose Info has no bucket
timings yet (an older backend) is *unmeasured*: each of its stages is assumed to cost
`unmeasured_stage_ms` (default 10 ms: a fresh replica refuses budgets below ~55 ms, admits the
200 ms default), or its share of its reported step p50 when that changed recently.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from moshi_grpc.services.gateway.config import CostSettings
from moshi_grpc.services.gateway.pipeline import Backend
from moshi_grpc.v1 import common_pb2


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

    def __init__(self, backend: Backend, settings: CostSettings) -> None:
        self.backend = backend
        self.settings = settings
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
            return legacy / self.backend.step_p50_stages
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
    """A predicted frame latency and its parts, milliseconds: each stage's step time (by
    stage name), the bucket it is stepped in (by backend kind), and the shared parts."""

    total_ms: float = 0.0
    stage_ms: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, int] = field(default_factory=dict)
    wait_ms: float = 0.0
    phase_ms: float = 0.0
    network_ms: float = 0.0

    def __add__(self, other: Estimate) -> Estimate:
        return Estimate(
            self.total_ms + other.total_ms,
            {**self.stage_ms, **other.stage_ms},
            {**self.buckets, **other.buckets},
            self.wait_ms + other.wait_ms,
            self.phase_ms + other.phase_ms,
            self.network_ms + other.network_ms,
        )

    def describe(self, order: list[str] | None = None) -> str:
        """One line for a refusal; `order`: the stage names in pipeline order."""
        names = order or list(self.stage_ms)
        stages = " + ".join(f"{n} {self.stage_ms[n]:.1f}" for n in names if n in self.stage_ms)
        buckets = ", ".join(f"{k} {b}" for k, b in self.buckets.items())
        return (
            f"~{self.total_ms:.1f} ms per frame: {stages} (buckets {buckets}) + batching wait "
            f"{self.wait_ms:.1f} + one tick {self.phase_ms:.1f} + network {self.network_ms:.1f}"
        )
