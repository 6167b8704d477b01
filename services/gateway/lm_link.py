"""A session's link to the LM: the Step stream, its history, and failover by replay.

The gateway keeps the session's LM history (per step: the user codes sent and the output
received; at most `GatewaySettings.lm_history_steps` steps, the LM's context). When the LM
stream fails (UNAVAILABLE, connection lost, stream closed early) or the session abandons it
(its replica fails its health probe, or it stopped answering: see `Session._check_stages`),
the Step stream is re-opened on another LM replica with a free slot, with `LmOpen.replay` =
that history (teacher-forced), and the frames that were sent but not answered are sent
again; the session carries on. The first answer from the new replica queues a `Failover`
event for the client, with the frames given up as late since the move (`frames_lost`).

Everything else about an answer (text to the client, codes to the decoder, silence while the
LM is not ready) is the session's: `run` hands each answered step to its `on_answer`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

import grpc

from moshi_grpc.services.common import tracing
from moshi_grpc.services.common.errors import BackendUnavailable
from moshi_grpc.services.common.metrics import GatewayMetrics
from moshi_grpc.services.gateway.budget import FrameSequencer, StageWatch
from moshi_grpc.services.gateway.config import GatewaySettings, SessionParams
from moshi_grpc.services.gateway.history import LmHistory
from moshi_grpc.services.gateway.replicas import Lease, Replica, ReplicaPool
from moshi_grpc.services.gateway.streams import (
    STEP,
    RetryableCapacity,
    backend_error,
    guarded_write,
    open_stream,
)
from moshi_grpc.v1 import gateway_pb2, lm_pb2

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
# Tries per session: a session that keeps failing over is better ended.
MAX_FAILOVERS = 4

# (gateway frame index, when the LM answered it, the step's response)
OnAnswer = Callable[[int, float, lm_pb2.StepOutput], Awaitable[None]]


class LmLink:
    """One session's LM Step stream, moved to another replica when it fails."""

    def __init__(
        self,
        *,
        session_id: str,
        params: SessionParams,
        lease: Lease,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        metadata: tuple[tuple[str, str], ...],
        pool: ReplicaPool | None,
        trace: tracing.SessionTrace = tracing.NOOP_SESSION,
        watch: StageWatch,
        seq: FrameSequencer,
        emit: Callable[[gateway_pb2.ConverseResponse], None],
        input_done: Callable[[], bool],
    ) -> None:
        """`emit` queues a reply to the client (the failover event); `input_done` says
        whether the client's input has ended (a stream that ends before that failed)."""
        self.session_id = session_id
        self.params = params
        self.lease = lease
        self.settings = settings
        self.metrics = metrics
        self.metadata = metadata
        self.pool = pool
        self.trace = trace
        self.loop = asyncio.get_running_loop()
        self._watch = watch
        self._seq = seq
        self._emit = emit
        self._input_done = input_done
        self.call = None
        self._open_msg: lm_pb2.LmOpen | None = None
        # Steps sent and not answered yet: (gateway frame, time sent, user codes).
        self.queue: deque[tuple[int, float, object]] = deque()
        # Answered steps, for replay on failover.
        lm_info = lease.lm.info
        self.history = LmHistory(
            max(1, settings.lm_history_steps),
            lm_info.num_codebooks if lm_info is not None and lm_info.num_codebooks else None,
        )
        self._index = 0  # next frame index on the current stream
        self.moving = False
        self._writes_done = False
        self._abandoned = None  # a call we cancelled because its replica is unhealthy
        self._abandon_reason = ""
        self.closing = False  # the session is ending: no more moves
        self.failovers = 0
        self._note: tuple[str, str, int] | None = None  # from, to, late at the move

    # ----------------------------------------------------------------- the stream

    def open(self, replay: list[lm_pb2.ReplayStep] | None = None) -> None:
        """Open a Step stream on the leased LM replica (its `open` is sent by `send_open`)."""
        mode = self.settings.backend_streams
        span = self.trace.stream("step", self.lease.lm.address, mode)  # ends the previous one
        self.call = open_stream(
            self.lease.lm,
            STEP,
            span.metadata(self.metadata),
            mode,
            self.settings.mux_coalesce_ms / 1000.0,
        )
        self._open_msg = span.stamp(
            lm_pb2.LmOpen(
                session_id=self.session_id,
                sampling=self.params.sampling,
                seed=self.params.seed,
                replay=replay or [],
            )
        )

    async def send_open(self) -> None:
        await guarded_write(
            self.lease.lm, "step", self.call, self._open_msg, self.settings.retry_after_ms, True
        )

    def cancel(self) -> None:
        """Cancel the stream (frees its slot) and allow no more moves."""
        self.closing = True
        call = self.call
        if call is not None and not call.done():
            call.cancel()

    async def forward(self, gw: int, now: float, codes) -> None:
        """Gateway frame `gw`'s user codes (encoded at `now`): send them, unless a move is
        in progress (the move sends every step still queued)."""
        self.queue.append((gw, now, codes))
        if not self.moving:
            self._watch.sent("step", now)
            await self._write(codes)

    async def input_done(self) -> None:
        """No more user codes: half-close the stream (after a move in progress, if any)."""
        self._writes_done = True
        if not self.moving:
            await self._done_writing()

    async def _write(self, codes) -> None:
        """Send one frame of user codes on the current stream. A failed write is left to
        the reader, which sees the stream's error and fails over (or ends the session)."""
        request = {"index": self._index, "codes": codes}  # a UserCodes (see streams.py)
        self._index += 1
        call = self.call
        try:
            await call.send(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError from a write on a call that was cancelled (by a
            # failover) under it; only a cancellation of this task itself goes on.
            task = asyncio.current_task()
            if not call.cancelled() or (task is not None and task.cancelling()):
                raise

    async def _done_writing(self) -> None:
        call = self.call
        try:
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        except asyncio.CancelledError:  # see _write
            task = asyncio.current_task()
            if not call.cancelled() or (task is not None and task.cancelling()):
                raise

    async def run(self, on_answer: OnAnswer) -> bool:
        """Read answers until the stream ends cleanly, failing over as needed; raises what
        ends the session. True when a failover event was queued at the end (nothing was
        left to answer after the move): the caller flushes it."""
        while True:
            call = self.call
            replica = self.lease.lm
            try:
                await self._read(call, on_answer)
                if not self._input_done():
                    raise BackendUnavailable(
                        f"{replica.kind} replica {replica.address} (step) closed the stream early"
                    )
                break
            except grpc.aio.AioRpcError as exc:
                error = backend_error(replica, "step", exc, self.settings.retry_after_ms)
                if exc.code() not in FAILOVER_CODES and self._note is None:
                    raise error from None
            except BackendUnavailable as exc:  # closed early
                error = exc
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._abandoned is not call or (task and task.cancelling()):
                    raise
                error = BackendUnavailable(
                    f"lm replica {replica.address} (step) {self._abandon_reason}"
                )
            if not await self._failover(replica):
                if isinstance(error, RetryableCapacity):  # the replica moved to was full
                    error = BackendUnavailable(f"{error}; no LM replica left to move to")
                raise error
        if self._note is not None:  # moved, but nothing was left to answer
            self._announce()
            return True
        return False

    async def _read(self, call, on_answer: OnAnswer) -> None:
        stage = self.metrics.stage_seconds.labels("step")
        history = self.history
        queue = self.queue
        loop = self.loop
        watch = self._watch
        while True:
            msg = await call.read()
            if msg is _EOF:
                break
            gw, sent, codes = queue.popleft()
            now = loop.time()
            watch.answered("step", now)
            stage.observe(now - sent)
            if self._note is not None:
                self._announce()
            if msg.ready:
                history.append(codes, msg.text_token, msg.moshi_codes)
            else:
                history.append(codes, None, ())
            await on_answer(gw, now, msg)

    # ----------------------------------------------------------------- failover

    @property
    def can_move(self) -> bool:
        """A move is still possible (failover on, tries left, not moving or abandoned)."""
        return (
            self.pool is not None
            and self.settings.lm_failover
            and self.failovers < MAX_FAILOVERS
            and not self.moving
            and self._abandoned is not self.call
        )

    def abandon(self, reason: str) -> None:
        """Cancel the call: its reader fails over (or ends the session UNAVAILABLE)."""
        call = self.call
        if self.moving or call is None or call.done() or self._abandoned is call:
            return
        log.warning("lm replica %s %s; failing over", self.lease.lm.address, reason)
        self._abandon_reason = reason
        self._abandoned = call
        call.cancel()

    async def _failover(self, failed: Replica) -> bool:
        """Move the stream to another replica with a free slot; False if none (or too many
        moves already, or the session is ending)."""
        if self.closing or self.pool is None or not self.settings.lm_failover:
            return False
        if self.failovers >= MAX_FAILOVERS:
            self.metrics.failovers.labels("lm", "failed").inc()
            return False
        target = self.pool.failover_lm(failed)
        if target is None:
            log.warning(
                "lm replica %s failed and no other LM replica has a free slot", failed.address
            )
            self.metrics.failovers.labels("lm", "failed").inc()
            return False
        self.failovers += 1
        self.moving = True
        try:
            old = self.call
            if old is not None and not old.done():
                old.cancel()
            self.lease.move_lm(target)
            replay = self.history.replay()
            late = self._seq.frames_late
            if self._note is not None:  # a second move before the first answered
                late = self._note[2]
            self._note = (failed.address, target.address, late)
            self.open(replay)
            self._index = len(replay)
            self._watch.restart("step", self.loop.time(), len(self.queue))
            try:
                await self.call.open(self._open_msg)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return True  # the reader sees this stream's error and tries again
            i = 0
            while i < len(self.queue):  # frames sent to the failed replica, and newer ones
                await self._write(self.queue[i][2])
                i += 1
            if self._writes_done:
                await self._done_writing()
        finally:
            self.moving = False
        self.metrics.failovers.labels("lm", "ok").inc()
        log.warning(
            "lm failover %s -> %s: replayed %d steps, resent %d frames",
            failed.address,
            target.address,
            len(self.history),
            len(self.queue),
        )
        return True

    def _announce(self) -> None:
        """First answer from the new replica: tell the client how many frames were lost."""
        source, target, late = self._note
        self._note = None
        self._emit(
            gateway_pb2.ConverseResponse(
                event=gateway_pb2.Event(
                    failover=gateway_pb2.Failover(
                        from_replica=source,
                        to_replica=target,
                        frames_lost=max(0, self._seq.frames_late - late),
                    )
                )
            )
        )
