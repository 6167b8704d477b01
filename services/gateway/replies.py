"""What the gateway tells a client, as protobuf replies: text pieces, events, the summary.

Builders only (no I/O, no clock): the session's writer (writer.py) decides when each leaves.
"""

from __future__ import annotations

from collections.abc import Iterator

from moshi_grpc.services.gateway.budget import Cause, Emission, FrameSequencer
from moshi_grpc.services.gateway.config import SessionParams
from moshi_grpc.services.gateway.links import Moved
from moshi_grpc.services.gateway.pipeline import Pipeline
from moshi_grpc.services.gateway.replicas import Lease
from moshi_grpc.services.gateway.text_policy import Action, Decision
from moshi_grpc.v1 import gateway_pb2

Response = gateway_pb2.ConverseResponse


def _event(**kind: object) -> Response:
    return Response(event=gateway_pb2.Event(**kind))


def text_piece(frame: int, text: str) -> Response:
    return Response(text=gateway_pb2.TextPiece(frame_index=frame, text=text))


def policy_applied(frame: int, decision: Decision) -> Response:
    mute = decision.mute_frames if decision.action is Action.MUTE else 0
    applied = gateway_pb2.TextPolicyApplied(
        frame_index=frame, action=decision.action.value, rule=decision.rule, mute_frames=mute
    )
    return _event(text_policy=applied)


def budget_missed(e: Emission) -> Response:
    missed = gateway_pb2.BudgetMissed(
        frame_index=e.index, late_ms=e.late_ms, consecutive=e.consecutive
    )
    return _event(budget_missed=missed)


def frames_dropped(first: int, count: int, stalled: bool) -> Response:
    reason = "backend_stalled" if stalled else "backlog_full"
    dropped = gateway_pb2.FramesDropped(first_frame_index=first, count=count, reason=reason)
    return _event(frames_dropped=dropped)


def started(
    session_id: str,
    params: SessionParams,
    lease: Lease,
    pipeline: Pipeline,
    persona: gateway_pb2.PersonaStarted | None = None,
) -> Response:
    """`SessionStarted`: each backend's replica in its `<kind>_replica` field, the model
    named by the backend that names it (the LM's `model/config`), how a persona was applied."""
    event = gateway_pb2.SessionStarted(
        session_id=session_id,
        budget_ms=params.budget_ms,
        max_consecutive_misses=params.max_consecutive_misses,
        sample_rate=params.sample_rate,
        input_pacing=params.input_pacing,
        persona=persona,
    )
    fields = gateway_pb2.SessionStarted.DESCRIPTOR.fields_by_name
    for backend in pipeline.backends:
        replica = lease.replicas[backend.kind]
        if f"{backend.kind}_replica" in fields:
            setattr(event, f"{backend.kind}_replica", replica.address)
        if backend.names_model and replica.info is not None:
            event.model = f"{replica.info.model_name}/{replica.info.config_name}"
    return _event(started=event)


def summary(seq: FrameSequencer, reason: str, duration_s: float) -> gateway_pb2.SessionSummary:
    p50, p95, p99 = seq.latency.percentiles_ms((50, 95, 99))
    return gateway_pb2.SessionSummary(
        frames_in=seq.frames_in,
        frames_out=seq.frames_out,
        frames_late=seq.frames_late,
        frames_dropped=seq.frames_dropped,
        frames_dropped_stalled=seq.frames_dropped_stalled,
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        latency_p99_ms=p99,
        latency_frames=len(seq.latency),
        duration_s=duration_s,
        reason=reason,
    )


def ended(session_summary: gateway_pb2.SessionSummary) -> Response:
    return _event(ended=gateway_pb2.SessionEnded(summary=session_summary))


def miss_events(emissions: list[Emission]) -> Iterator[tuple[Emission, Response | None]]:
    """Each emitted frame with the event that goes before its audio: `BudgetMissed` for a
    late frame, `FramesDropped` for the first of a run of consecutive dropped frames (same
    reason) in this batch, none otherwise."""
    run_end = -1
    for i, e in enumerate(emissions):
        event = None
        if e.cause is Cause.LATE:
            event = budget_missed(e)
        elif e.cause is Cause.DROPPED and e.index > run_end:
            run_end = e.index
            for nxt in emissions[i + 1 :]:
                if nxt.cause is not Cause.DROPPED or nxt.index != run_end + 1:
                    break
                if nxt.stalled != e.stalled:
                    break
                run_end = nxt.index
            event = frames_dropped(e.index, run_end - e.index + 1, e.stalled)
        yield e, event


class MoveReport:
    """The client's `Failover` event for a link that moved: sent with the first answer from
    the new replica, counting the frames given up as late since the move (a second move
    before that answer keeps the first one's count and names the last replicas)."""

    def __init__(self) -> None:
        self._moved: Moved | None = None
        self._late_at_move = 0

    def moved(self, event: Moved, frames_late: int) -> None:
        if self._moved is None:
            self._late_at_move = frames_late
        self._moved = event

    def answered(self, frames_late: int) -> Response | None:
        """The event to send now (None: no move since the last answer)."""
        moved = self._moved
        if moved is None:
            return None
        self._moved = None
        lost = max(0, frames_late - self._late_at_move)
        failover = gateway_pb2.Failover(
            from_replica=moved.source, to_replica=moved.target, frames_lost=lost
        )
        return _event(failover=failover)
