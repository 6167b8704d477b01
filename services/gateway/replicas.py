"""Backend replicas as the gateway sees them: one shared channel each, the latest view of
their load, and the sessions pinned to them (`Lease`).

A replica's view comes from its last `Info` answer (discovery.py polls it). Between polls the
gateway counts the sessions it placed and released itself, so a burst of new sessions does
not pile onto the replica that looked emptiest at the last poll. Sessions open their own
streams on the replica's channel, or share its multiplexed streams (`Replica.mux`, see
streams.py).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc

from moshi_grpc.services.common.buckets import bucket_for, bucket_ladder
from moshi_grpc.services.gateway.config import CostSettings
from moshi_grpc.services.gateway.cost import Estimate, ReplicaCost
from moshi_grpc.services.gateway.pipeline import Backend
from moshi_grpc.v1 import common_pb2


@dataclass
class Replica:
    """One backend address with its shared channel and the latest view of its load."""

    backend: Backend
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

    def __post_init__(self) -> None:
        if self.cost is None:
            self.cost = ReplicaCost(self.backend, CostSettings())
        if self.stub is None:
            self.stub = self.backend.stub(self.channel)

    @property
    def kind(self) -> str:
        return self.backend.kind

    def close_streams(self) -> None:
        """Cancel this replica's multiplexed streams (it is being forgotten)."""
        for stream in self.mux.values():
            stream.close()
        self.mux.clear()

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
        per = self.backend.slots_per_session
        if self.info is None:
            return self.local_sessions * per
        newer = sum(1 for t in self.recent_leases if t > self.info_at)
        gone = sum(1 for t in self.recent_releases if t > self.info_at)
        return max(self.info.slots_in_use + (newer - gone) * per, self.local_sessions * per)

    @property
    def join_bucket(self) -> int:
        """The bucket of the replica's ladder (1, 2, 4, ... capped at its slots) that a new
        session would be stepped in: the smallest holding its sessions in use + 1."""
        total = self.slots_total
        return bucket_for(min(self.slots_used + 1, total), bucket_ladder(total))

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

    def forget_before(self, now: float) -> None:
        """A fresh Info answer at `now` counts every session placed or gone before it."""
        for recent in (self.recent_leases, self.recent_releases):
            while recent and recent[0] <= now:
                recent.popleft()

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
            and self.free_slots >= self.backend.slots_per_session
        )


def least_loaded(replicas: Iterable[Replica]) -> Replica:
    """The replica with the fewest slots in use for its size, then the fastest (step p99),
    then by address (a stable choice)."""
    return min(replicas, key=lambda r: (r.load, r.step_p99_ms, r.address))


@dataclass
class Lease:
    """A session's pinned replica per backend kind, the frame latency admission predicted
    for it there, and what it needs of a kind's replicas (`admission.Need`, by kind: a move
    must meet it too); `release()` is idempotent."""

    replicas: dict[str, Replica]
    estimate: Estimate | None = None
    needs: dict = field(default_factory=dict)
    _released: bool = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            for replica in self.replicas.values():
                replica.released()

    def move(self, kind: str, replica: Replica) -> None:
        """The session's `kind` slot is now on `replica` (a move, e.g. LM failover)."""
        if not self._released:
            self.replicas[kind].released()
            replica.placed()
        self.replicas[kind] = replica
