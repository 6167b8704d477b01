"""Admission: which replicas a new session gets, or why it is refused.

For each backend of the pipeline (in `Pipeline.backends` order, the scarcest first), the
least-loaded available replica whose predicted frame latency (cost.py) fits the session's
budget, with the backends not chosen yet counted at their best replica. A session is refused
with RESOURCE_EXHAUSTED (reason "capacity": no free slot; "budget": the prediction exceeds
the budget on every replica with a free slot; trailing `retry-after-ms`: when the recent
samples that push the prediction over will have expired) or UNAVAILABLE (no healthy
replica). A running session that must move (LM failover) goes to the least-loaded other
replica with a free slot, without a budget check: moving beats ending it.

A session may also need something of a backend's replicas beyond a free slot (`Need`: a
model that takes its persona, persona.py): only the replicas whose Info meets it are
candidates, for its admission and for its moves. When none of the replicas that answered
Info meets it, the session is refused with FAILED_PRECONDITION (`NoModel`: the model it
needs is not behind this gateway; retrying cannot help).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from moshi_grpc.services.common.errors import CapacityExhausted, ErrorCode, WrongModel
from moshi_grpc.services.gateway.config import CostSettings
from moshi_grpc.services.gateway.cost import Estimate
from moshi_grpc.services.gateway.discovery import ReplicaPool, ReplicaSet
from moshi_grpc.services.gateway.pipeline import Backend, Pipeline
from moshi_grpc.services.gateway.replicas import Lease, Replica, least_loaded
from moshi_grpc.v1 import common_pb2


@dataclass(frozen=True)
class Need:
    """What a session needs of one backend's replicas beyond a free slot."""

    accepts: Callable[[common_pb2.BackendInfo], bool]  # a replica's Info -> it can serve it
    # The replicas' Infos (none accepts) -> the refusal's message: which model is missing.
    refusal: Callable[[Sequence[common_pb2.BackendInfo]], str]


class NoModel(WrongModel):
    """No replica behind the gateway serves the model a session needs (FAILED_PRECONDITION);
    `reason` is the refusal metric's label."""

    reason = "wrong_model"


def candidates(replicas: ReplicaSet, need: Need | None) -> list[Replica]:
    """The replicas of the set that could serve a session with `need` (health and slots
    aside); NoModel when replicas answered Info and none of them meets it."""
    every = list(replicas.replicas.values())
    if need is None:
        return every
    infos = [r.info for r in every if r.info is not None]
    fit = [r for r in every if r.info is not None and need.accepts(r.info)]
    if infos and not fit:
        raise NoModel(need.refusal(infos))
    return fit


class NoCapacity(CapacityExhausted):
    """No replica can take a new session now; `reason` is the metric label, `retry_after_ms`
    the hint given to the client."""

    def __init__(self, message: str, reason: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_ms = retry_after_ms
        if reason == "backend_unavailable":
            self.code = ErrorCode.UNAVAILABLE


def choose(
    replicas: ReplicaSet,
    budget_ms: float,
    frame_estimate_ms: Callable[[Replica], float],
    describe: Callable[[Replica], str] | None = None,
    retry_after_ms: Callable[[], int] | None = None,
    need: Need | None = None,
) -> Replica:
    """Least-loaded available replica of the set (meeting `need`) whose predicted frame
    latency fits."""
    kind = replicas.backend.kind
    pool = candidates(replicas, need)
    available = [r for r in pool if r.available]
    if not available:
        if not any(r.healthy for r in pool):
            raise NoCapacity(f"no healthy {kind} replica", "backend_unavailable", 1000)
        raise NoCapacity(f"no {kind} replica has a free slot", "capacity", 1000)
    fitting = [r for r in available if frame_estimate_ms(r) <= budget_ms]
    if not fitting:
        best = min(available, key=frame_estimate_ms)
        what = describe(best) if describe else f"~{frame_estimate_ms(best):.0f} ms per frame"
        raise NoCapacity(
            f"predicted frame latency on the best {kind} replica {best.address} "
            f"({what}) cannot meet the {budget_ms:.0f} ms budget",
            "budget",
            retry_after_ms=retry_after_ms() if retry_after_ms else 2000,
        )
    return least_loaded(fitting)


def _total(estimate: Estimate) -> float:
    return estimate.total_ms


class Admission:
    """Places sessions on the pool's replicas for one pipeline (see the module docstring)."""

    def __init__(
        self,
        pool: ReplicaPool,
        pipeline: Pipeline,
        cost: CostSettings,
        retry_after_ms: int = 1000,
    ) -> None:
        self.pool = pool
        self.pipeline = pipeline
        self.cost = cost
        self.retry_after_ms = retry_after_ms
        self._order = [s.name for s in pipeline.stages]
        # Parts are added in the order the stages first use each backend (for `describe`).
        seen = dict.fromkeys(s.backend.kind for s in pipeline.stages)
        self._kinds = list(seen)

    def _part(self, replica: Replica, now: float, *, idle: bool = False) -> Estimate:
        """The frame-latency share of one backend's stages on `replica` (idle: as if empty
        and without recent samples, from warm-up times)."""
        backend = replica.backend
        bucket = 1 if idle else replica.join_bucket
        out = Estimate(buckets={backend.kind: bucket})
        rtt = replica.cost.rtt_ms(now)
        for stage in self.pipeline.stages_of(backend):
            ms = replica.cost.stage_ms(stage.name, bucket, now, recent=not idle)
            phase = ms if stage.phase else 0.0
            wait = self.cost.batch_wait_ms
            out.stage_ms[stage.name] = ms
            out.total_ms += ms + phase + wait + rtt
            out.wait_ms += wait
            out.phase_ms += phase
            out.network_ms += rtt
        return out

    def _sum(self, parts: Mapping[str, Estimate]) -> Estimate:
        total = Estimate()
        for kind in self._kinds:
            total = total + parts[kind]
        return total

    def estimate(self, replicas: Mapping[str, Replica], *, idle: bool = False) -> Estimate:
        """Predicted frame latency of a new session on these replicas (one per backend kind;
        idle=True: as if all were empty and had no recent samples)."""
        now = self.pool.clock()
        return self._sum({k: self._part(r, now, idle=idle) for k, r in replicas.items()})

    def _budget_retry_ms(self, budget_ms: float, available: dict[str, list[Replica]]):
        """Retry hint for a budget refusal: when the recent samples that push the prediction
        over the budget will have expired, if idle replicas could meet it; else the default."""

        def hint() -> int:
            now = self.pool.clock()
            kinds = list(available)
            idle_fits = any(
                self.estimate(dict(zip(kinds, combo, strict=True)), idle=True).total_ms <= budget_ms
                for combo in itertools.product(*available.values())
            )
            expiry = [r.cost.recent_expire_at() for rs in available.values() for r in rs]
            expiry = [t for t in expiry if t is not None and t > now]
            if not idle_fits or not expiry:
                return self.retry_after_ms
            return max(self.retry_after_ms, math.ceil((max(expiry) - now) * 1000.0))

        return hint

    def lease(self, budget_ms: float, needs: Mapping[str, Need] | None = None) -> Lease:
        """Pin a new session to one replica per backend (module docstring), or raise
        NoCapacity (NoModel: no replica of a backend meets the session's `needs`, by kind)."""
        needs = dict(needs or {})
        now = self.pool.clock()
        sets = self.pool.sets
        available = {
            b.kind: [r for r in candidates(sets[b.kind], needs.get(b.kind)) if r.available]
            for b in self.pipeline.backends
        }
        parts = {  # at first, each backend at its best replica
            kind: min((self._part(r, now) for r in rs), key=_total, default=Estimate())
            for kind, rs in available.items()
        }
        retry = self._budget_retry_ms(budget_ms, available)
        chosen: dict[str, Replica] = {}
        for backend in self.pipeline.backends:
            kind = backend.kind
            rest = {k: p for k, p in parts.items() if k != kind}

            def with_rest(r: Replica, kind: str = kind, rest: dict = rest) -> Estimate:
                return self._sum({**rest, kind: self._part(r, now)})

            chosen[kind] = choose(
                sets[kind],
                budget_ms,
                lambda r, f=with_rest: f(r).total_ms,
                lambda r, f=with_rest: f(r).describe(self._order),
                retry,
                needs.get(kind),
            )
            parts[kind] = self._part(chosen[kind], now)
        for replica in chosen.values():
            replica.placed()
        return Lease(chosen, self._sum(parts), needs=needs)

    def move_target(
        self, backend: Backend, failed: Replica, need: Need | None = None
    ) -> Replica | None:
        """Where a running session moves off `failed`: the least-loaded other available
        replica of its backend that meets its `need`, or None."""
        try:
            pool = candidates(self.pool.sets[backend.kind], need)
        except NoModel:
            return None
        others = [r for r in pool if r.available and r is not failed]
        return least_loaded(others) if others else None
