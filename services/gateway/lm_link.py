"""A session's link to the LM: the Step stream, its history, and the one owner of moving it.

The link keeps the session's LM history (per step: the user codes sent and the output
received; at most `GatewaySettings.lm_history_steps` steps, the LM's context). `move(reason)`
is the only place that decides to move the session to another LM replica, for one of three
reasons, each noticed by the link itself:

- ERROR: its stream failed (UNAVAILABLE, connection lost, ...) or ended before the session
  was done with it (seen by its reader);
- HEALTH: its replica fails its health probe while the session waits on it (its clock);
- STALL: it has not answered for half the stalled-stage limit (its clock; the whole limit
  ends the session, links.py).

A move pins the session to the least-loaded other LM replica with a free slot, opens the
Step stream there with `LmOpen.replay` = the history (teacher-forced), and sends again the
frames the old replica had not answered; the session carries on. The move returns its event
(`links.Moved`), which the link's reader hands to the session with its next reply (the
session tells the client with the first answer from the new replica). When it cannot move
(failover off, no free replica, too many moves), an error or a failed health check ends the
session (UNAVAILABLE), and a stall is left to the stalled-stage rule.
"""

from __future__ import annotations

import asyncio
import logging
from enum import Enum
from typing import Any

import grpc

from moshi_grpc.services.common.errors import BackendUnavailable, ServiceError
from moshi_grpc.services.gateway.ending import StageStalled
from moshi_grpc.services.gateway.history import LmHistory
from moshi_grpc.services.gateway.links import LinkContext, Moved, Reply, StageLink
from moshi_grpc.services.gateway.pipeline import Stage
from moshi_grpc.services.gateway.replicas import Replica
from moshi_grpc.services.gateway.streams import CLOSED, RetryableCapacity, backend_error

log = logging.getLogger(__name__)

_EOF = grpc.aio.EOF

# LM stream failures that move the session to another LM replica (when one has a free slot):
# the replica or the connection is gone. Anything else (bad input, refusals) ends the session.
FAILOVER_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
    }
)
# Moves per session: a session that keeps failing over is better ended.
MAX_FAILOVERS = 4


class MoveReason(str, Enum):
    """Why the LM link considers moving (see the module docstring)."""

    ERROR = "error"
    HEALTH = "health"
    STALL = "stall"


class LmLink(StageLink):
    """The Step stream of one session, moved to another LM replica when it fails."""

    def __init__(self, stage: Stage, ctx: LinkContext) -> None:
        super().__init__(stage, ctx)
        info = self.replica.info
        self.history = LmHistory(
            max(1, ctx.settings.lm_history_steps),
            info.num_codebooks if info is not None and info.num_codebooks else None,
        )
        self.failovers = 0
        self._move_after_s = self.watch.limit_s / 2
        self._moving = False  # a move's open and resends are not all sent yet
        self._resume = False  # the reader sends them before it reads again
        self._proven = True  # the replica answered since the last move
        self._events: list[Moved] = []  # produced by the clock, for the next reply

    # ----------------------------------------------------------------- the stream

    async def forward(self, frame: int, now: float, payload: Any) -> None:
        """Send frame `frame`'s user codes, unless a move is under way (it sends every
        frame still owed). A failed write is left to the reader, which moves."""
        self.queue.append((frame, now, payload))
        self.watch.sent(self.stage.name, now)
        if not self._moving:
            await self._send(payload)

    async def _send(self, payload: Any) -> None:
        request = self.stage.request(self._index, payload)
        self._index += 1
        try:
            await self.call.send(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass

    async def input_done(self) -> None:
        self._writes_done = True
        if not self._moving:
            await self._half_close()

    async def read(self) -> Reply | None:
        """The next answer or the events of a move; None at the clean end. Raises what ends
        the session."""
        while True:
            if self._events:
                events, self._events = tuple(self._events), []
                return Reply(events=events)
            if self._resume:
                self._resume = False
                await self._resend()
            call = self.call
            try:
                msg = await call.read()
            except grpc.aio.AioRpcError as exc:
                if call is not self.call:
                    continue  # a stream the session left: its end is not the session's
                retry_ms = self.ctx.settings.retry_after_ms
                error = backend_error(self.replica, self.stage.name, exc, retry_ms)
                if exc.code() not in FAILOVER_CODES and self._proven:
                    raise error from None
            else:
                if call is not self.call:
                    continue  # the stream the session left: what it still owed was resent
                if msg is CLOSED:
                    if self._error is not None:
                        raise self._error
                    return None
                if msg is not _EOF:
                    self._proven = True
                    if self._answers_open(msg):
                        continue  # a moved session's prompt is in: the open's answer
                    return self._answered(msg)
                if self._writes_done:
                    return None
                error = BackendUnavailable(f"{self._where()} closed the stream early")
            self._events += self.move(MoveReason.ERROR, error)
            if self._error is not None:
                raise self._error

    def _answered(self, msg: Any) -> Reply:
        codes = self.queue[0][2]
        reply = super()._answered(msg)
        if msg.ready:
            self.history.append(codes, msg.text_token, msg.moshi_codes)
        else:
            self.history.append(codes, None, ())
        return reply

    # ----------------------------------------------------------------- moving

    def move(self, reason: MoveReason, error: ServiceError) -> list[Moved]:
        """Move the session's LM to another replica for `reason` (`error`: what ends the
        session when it cannot move). Returns the move's events; none when it stays."""
        failed = self.replica
        target = self._target(reason, failed)
        if target is None:
            if reason is not MoveReason.STALL:
                if isinstance(error, RetryableCapacity):  # the replica moved to was full
                    error = BackendUnavailable(f"{error}; no LM replica left to move to")
                self._fail(error)
            return []
        log.warning("%s: %s; moving to %s", self._where(), error, target.address)
        self.failovers += 1
        self._moving = self._resume = True
        self._proven = False
        old = self.call
        self.ctx.lease.move(self.stage.backend.kind, target)
        replay = self.history.replay()
        message = self.stage.open(self._open_ctx)
        message.replay.extend(replay)
        self._connect(message)
        old.close()  # frees its slot (if the replica is still there)
        self._index = len(replay)
        self.watch.restart(self.stage.name, self.loop.time(), len(self.queue))
        return [Moved(failed.address, target.address)]

    def _target(self, reason: MoveReason, failed: Replica) -> Replica | None:
        """Where to move, or None; a failed move is counted unless it was for a stall (the
        stalled-stage rule decides about that one)."""
        if self._closed or not self.ctx.settings.lm_failover:
            return None
        target = None
        if self.failovers < MAX_FAILOVERS:
            kind = self.stage.backend.kind
            need = self.ctx.lease.needs.get(kind)
            target = self.ctx.admission.move_target(self.stage.backend, failed, need)
            if target is None and reason is not MoveReason.STALL:
                log.warning("%s failed and no other LM replica has a free slot", self._where())
        if target is None and reason is not MoveReason.STALL:
            self.ctx.metrics.failovers.labels(self.stage.backend.kind, "failed").inc()
        return target

    async def _resend(self) -> None:
        """After a move: the open (with the replay), then every frame still owed."""
        try:
            try:
                await self.call.open(self._open_msg)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return  # the reader sees this stream's error and moves again
            i = 0
            while i < len(self.queue):  # frames sent to the failed replica, and newer ones
                await self._send(self.queue[i][2])
                i += 1
            if self._writes_done:
                await self._half_close()
        finally:
            self._moving = False
        self.ctx.metrics.failovers.labels(self.stage.backend.kind, "ok").inc()
        log.warning(
            "%s: replayed %d steps, resent %d frames",
            self._where(),
            len(self.history),
            len(self.queue),
        )

    # ----------------------------------------------------------------- the clock

    @property
    def _may_move(self) -> bool:
        settings = self.ctx.settings
        return settings.lm_failover and self.failovers < MAX_FAILOVERS and not self._closed

    def _next_check(self, now: float) -> float:
        at = super()._next_check(now)
        if self._may_move:
            move_at = self.watch.next_check(now, self._move_after_s)
            if move_at is not None and move_at > now:  # (past: retried every probe interval)
                at = min(at, move_at)
        return at

    def _check(self, now: float) -> None:
        if self._moving:
            return  # its stage watch restarted at the move
        if self._gone(now):
            self._events += self.move(MoveReason.HEALTH, self._gone_error())
            return
        if self._may_move and self.watch.stalled(now, self._move_after_s) is not None:
            silent = f"has not answered for {self._silent_for(now):.1f} s"
            moved = self.move(MoveReason.STALL, StageStalled(f"{self._where()} {silent}"))
            if moved:
                self._events += moved
                return
        super()._check(now)
