"""A session's link to one stage of its pipeline: the stream, the frames it owes, its clock.

One link per stage (the pipeline names the class, `Stage.link`). A link opens the stage's
stream on the replica the session's lease pinned for the stage's backend, sends frames
(`forward`), remembering which gateway frame each one is (streams answer in order, and the
backend's indices skip dropped frames), half-closes it (`input_done`), and reads its answers
(`read`), each as a `Reply`: the frame, when it was answered, and what the stage's `answer`
made of it (pipeline.Outcome).

A link has its own clock, on its own stage and replica (the stall clock is
`StageWatch.next_check`, nowhere else):

- the stalled-stage rule: a stage that owes an answer and has not given any for the budget +
  K frames' time (K = the session's max_consecutive_misses; 0 = off) ends the session with
  DEADLINE_EXCEEDED, or UNAVAILABLE when its replica also fails its health probe. Misses alone
  cannot be relied on for this: a client that stops sending gives no frame to count;
- the health rule: a replica that fails its health probe while the session waits on it
  (something owed there, unanswered for a probe interval) is gone: UNAVAILABLE.

Every failure reaches the session through `read()`, which raises it: the stream's error, a
stream that ends before the link is done writing, or its clock's verdict (the link then
closes its stream, which frees the slot and wakes its reader). `lm_link.LmLink` moves to
another replica instead where it can.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc

from moshi_grpc.services.common import tracing
from moshi_grpc.services.common.errors import BackendUnavailable, ServiceError
from moshi_grpc.services.common.metrics import GatewayMetrics
from moshi_grpc.services.gateway.admission import Admission
from moshi_grpc.services.gateway.budget import StageWatch
from moshi_grpc.services.gateway.config import GatewaySettings, SessionParams
from moshi_grpc.services.gateway.ending import StageStalled
from moshi_grpc.services.gateway.pipeline import (
    BadAnswer,
    OpenAnswer,
    OpenContext,
    Outcome,
    Stage,
)
from moshi_grpc.services.gateway.replicas import Lease, Replica
from moshi_grpc.services.gateway.streams import (
    CLOSED,
    FRAME_S,
    backend_error,
    guarded_write,
    open_refusal,
    open_stream,
)

log = logging.getLogger(__name__)

_EOF = grpc.aio.EOF


@dataclass
class LinkContext:
    """What the links of one session share."""

    session_id: str
    params: SessionParams
    settings: GatewaySettings
    metrics: GatewayMetrics
    metadata: tuple[tuple[str, str], ...]
    lease: Lease
    admission: Admission  # where a link that moves goes
    trace: tracing.SessionTrace = tracing.NOOP_SESSION

    @property
    def stall_limit_s(self) -> float:
        """The stalled-stage limit: the budget + K frames' time (when K misses in a row
        would have been counted, had the client kept sending); 0 = never (K = 0)."""
        k = self.params.max_consecutive_misses
        return self.params.budget_ms / 1000.0 + k * FRAME_S if k > 0 else 0.0


class Moved(NamedTuple):
    """A link moved from replica address `source` to `target` (LM failover)."""

    source: str
    target: str


@dataclass(slots=True)
class Reply:
    """What `read()` returns: an answer to gateway frame `frame` at time `at`, and/or the
    events the link produced since its last reply (`outcome` None: events only)."""

    frame: int = -1
    at: float = 0.0
    outcome: Outcome | None = None
    events: tuple[Moved, ...] = ()


class StageLink:
    """One stage's stream for one session, on one replica (see the module docstring)."""

    def __init__(self, stage: Stage, ctx: LinkContext) -> None:
        self.stage = stage
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.call: Any = None
        self._open_ctx: OpenContext | None = None
        self._open_msg: Any = None
        # Frames sent and not answered yet: (gateway frame, time sent, payload).
        self.queue: deque[tuple[int, float, Any]] = deque()
        self.watch = StageWatch((stage.name,), ctx.stall_limit_s)
        self._index = 0  # next frame index on the current stream
        self._writes_done = False
        self._closed = False  # the session is ending
        self._error: BaseException | None = None  # the link's failure (its reader raises it)
        self._timer: asyncio.TimerHandle | None = None
        self._health_s = max(0.05, ctx.settings.refresh_interval_s)
        self._observe = ctx.metrics.stage_seconds.labels(stage.name).observe

    @property
    def replica(self) -> Replica:
        return self.ctx.lease.replicas[self.stage.backend.kind]

    def _where(self) -> str:
        replica = self.replica
        return f"{replica.kind} replica {replica.address} ({self.stage.name})"

    # ----------------------------------------------------------------- the stream

    def open(self, ctx: OpenContext) -> None:
        """Open the stream on the leased replica (its open message goes out in `send_open`)."""
        self._open_ctx = ctx
        self._connect(self.stage.open(ctx))

    def _connect(self, message: Any) -> None:
        settings = self.ctx.settings
        mode = settings.backend_streams
        replica = self.replica
        span = self.ctx.trace.stream(self.stage.name, replica.address, mode)
        self.call = open_stream(
            replica,
            self.stage,
            span.metadata(self.ctx.metadata),
            mode,
            settings.mux_coalesce_ms / 1000.0,
        )
        self._open_msg = span.stamp(message)

    async def send_open(self) -> None:
        """Send the open; when the stage's backend answers it (`Stage.open_answer`), wait
        for that answer (at most `GatewaySettings.open_answer_timeout_s`): the session goes
        live only after it."""
        sent = self.loop.time()
        await self._guarded(self._open_msg, True)
        answer = self.stage.open_answer
        if answer is not None and answer.expected(self._open_msg):
            msg = await self._open_answer(answer)
            answer.received(self._open_ctx, msg, self.loop.time() - sent)

    async def _open_answer(self, answer: OpenAnswer) -> Any:
        limit_s = self.ctx.settings.open_answer_timeout_s
        try:
            msg = await asyncio.wait_for(self.call.read(), limit_s)
        except asyncio.TimeoutError:
            raise StageStalled(
                f"{self._where()} did not answer the session's open within {limit_s:g} s "
                "(--open-answer-timeout-s)"
            ) from None
        except grpc.aio.AioRpcError as exc:
            retry_ms = self.ctx.settings.retry_after_ms
            raise open_refusal(self.replica, self.stage.name, exc, retry_ms) from None
        if msg is CLOSED or msg is _EOF:
            raise BackendUnavailable(f"{self._where()} closed the stream before answering its open")
        if not answer.matches(msg):
            raise BackendUnavailable(f"{self._where()} answered a frame before the open")
        return msg

    def _answers_open(self, msg: Any) -> bool:
        """`msg` is the backend's answer to an open, not a frame's (see OpenAnswer)."""
        answer = self.stage.open_answer
        return answer is not None and answer.matches(msg)

    async def _guarded(self, message: Any, is_open: bool = False) -> None:
        retry_ms = self.ctx.settings.retry_after_ms
        await guarded_write(self.replica, self.stage.name, self.call, message, retry_ms, is_open)

    async def forward(self, frame: int, now: float, payload: Any) -> None:
        """Send gateway frame `frame`'s payload (ready at `now`); a failed write raises."""
        self.queue.append((frame, now, payload))
        self.watch.sent(self.stage.name, now)
        request = self.stage.request(self._index, payload)
        self._index += 1
        await self._guarded(request)

    async def input_done(self) -> None:
        """Nothing more to send: half-close the stream."""
        self._writes_done = True
        await self._half_close()

    async def _half_close(self) -> None:
        try:
            await self.call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the stream failed: its reader reports it

    async def read(self) -> Reply | None:
        """The next answer; None once the stream ended cleanly (or the session closed it)."""
        try:
            msg = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            retry_ms = self.ctx.settings.retry_after_ms
            raise backend_error(self.replica, self.stage.name, exc, retry_ms) from None
        if msg is CLOSED:
            if self._error is not None:
                raise self._error
            return None
        if msg is _EOF:
            if not self._writes_done:
                raise BackendUnavailable(f"{self._where()} closed the stream early")
            return None
        return self._answered(msg)

    def _answered(self, msg: Any) -> Reply:
        frame, sent, _ = self.queue.popleft()
        now = self.loop.time()
        self.watch.answered(self.stage.name, now)
        self._observe(now - sent)
        try:
            outcome = self.stage.answer(msg)
        except BadAnswer as exc:
            raise BackendUnavailable(f"{self._where()} {exc}") from None
        return Reply(frame, now, outcome)

    def close(self) -> None:
        """The session ends: stop the clock and drop the stream (the backend frees the slot).
        Safe to call more than once."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.call is not None:
            self.call.close()

    def _fail(self, exc: BaseException) -> None:
        """The link cannot go on: its reader raises `exc` (closing the stream wakes it)."""
        if self._error is None:
            self._error = exc
            self.call.close()

    # ----------------------------------------------------------------- the clock

    def start_clock(self) -> None:
        self._arm(self.loop.time())

    def _arm(self, now: float) -> None:
        at = self._next_check(now)
        self._timer = self.loop.call_at(max(at, now + 0.01), self._tick)

    def _next_check(self, now: float) -> float:
        """The next health probe interval, or earlier when the stage could stall."""
        at = now + self._health_s
        stall = self.watch.next_check(now)
        return at if stall is None else min(at, stall)

    def _tick(self) -> None:
        self._timer = None
        if self._closed or self._error is not None:
            return
        now = self.loop.time()
        self._check(now)
        if self._error is None and not self._closed:
            self._arm(now)

    def _check(self, now: float) -> None:
        if self._gone(now):
            self._fail(self._gone_error())
        elif self.watch.stalled(now) is not None:
            self._fail(self._stalled_error(now))

    def _silent_for(self, now: float) -> float:
        """How long the stage has owed an answer (0: it owes nothing)."""
        since = self.watch.silent_since(self.stage.name)
        return 0.0 if since is None else now - since

    def _unhealthy(self) -> bool:
        replica = self.replica
        return replica.failures > 0 and not replica.healthy

    def _gone(self, now: float) -> bool:
        return self._unhealthy() and self._silent_for(now) >= self._health_s

    def _gone_error(self) -> ServiceError:
        return BackendUnavailable(f"{self._where()} stopped answering health checks")

    def _stalled_error(self, now: float) -> ServiceError:
        params = self.ctx.params
        what = (
            f"{self._where()} has not answered for {self._silent_for(now):.1f} s (the "
            f"{params.budget_ms} ms budget + {params.max_consecutive_misses} frames' time)"
        )
        if self._unhealthy():
            return BackendUnavailable(f"{what} and fails its health checks")
        return StageStalled(f"{what}; ending the session")
