"""One conversation: the client's audio through the session's pipeline and back.

The pipeline (pipeline.py; today's is moshi_pipeline.MOSHI: encode -> step -> decode) says
which stages a frame goes through. Per stage the session has a link (links.py) that owns the
stage's stream on the replica its lease pinned, and a reader task; everything is pipelined
(frame t+1 goes out before frame t's output is back):

    client reader : read chunks, convert to 24 kHz frames (audio_io.py), admit or drop
                    (the sequencer), -> the first stage
    stage readers : each answer's text piece -> the client at once (text_hook.py); its
                    payload -> the next stage, or the frame ends there (audio, or silence)
    pump (handler): deadline timer, idle timeout, maximum length, the end of the session

Replies leave through the writer (writer.py), one writer at a time. Whatever ends the session
is reported to its `Ending` (ending.py), which names the reason; a link's failure (its
stream, its replica's health, a stalled stage) comes out of its reader. A link that can move
to another replica (the LM's, lm_link.py) does so on its own and reports the move, which the
client hears of with the first answer from the new replica.

Misses (the budget contract, true at the default settings): a frame given up at its deadline
(late) and a frame dropped for backlog while the oldest frame at the backends is past its
deadline (a stage not answering) both count toward the consecutive-miss streak; K in a row
end the session (DEADLINE_EXCEEDED). Input faster than real time is dropped as overflow (not
a miss). With INPUT_PACING_FLOW_CONTROL the client reader instead waits for room at the
backends (gRPC flow control pushes back on the client): nothing is dropped, and the idle
timeout does not count that wait.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from moshi_grpc.services.common import tracing
from moshi_grpc.services.common.errors import BudgetExceeded, IdleTimeout, OutOfOrder
from moshi_grpc.services.common.metrics import GatewayMetrics
from moshi_grpc.services.gateway import replies
from moshi_grpc.services.gateway.admission import Admission
from moshi_grpc.services.gateway.audio_io import SessionAudio
from moshi_grpc.services.gateway.budget import FrameSequencer
from moshi_grpc.services.gateway.config import GatewaySettings, SessionParams
from moshi_grpc.services.gateway.ending import Ending, MaxSessionLength
from moshi_grpc.services.gateway.links import LinkContext, Reply, StageLink
from moshi_grpc.services.gateway.pipeline import OpenContext
from moshi_grpc.services.gateway.replicas import Lease
from moshi_grpc.services.gateway.streams import FRAME_S
from moshi_grpc.services.gateway.text_hook import TextHook
from moshi_grpc.services.gateway.writer import ReplyWriter
from moshi_grpc.v1 import gateway_pb2

_EOF = grpc.aio.EOF


class Session:
    """Runs one admitted conversation until it ends; `pump()` raises the final error."""

    def __init__(
        self,
        *,
        session_id: str,
        params: SessionParams,
        lease: Lease,
        admission: Admission,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        context: grpc.aio.ServicerContext,
        metadata: tuple[tuple[str, str], ...] = (),
        trace: tracing.SessionTrace = tracing.NOOP_SESSION,
    ) -> None:
        self.session_id, self.params, self.lease = session_id, params, lease
        self.settings, self.metrics = settings, metrics
        self.pipeline = pipeline = admission.pipeline  # what the session runs
        self.context = context  # the client's Converse call
        self._open_ctx = OpenContext(session_id, params, lease, metadata)
        self.loop = asyncio.get_running_loop()
        self._started_wall = time.monotonic()
        self.flow_control = params.input_pacing == gateway_pb2.INPUT_PACING_FLOW_CONTROL
        self.seq = FrameSequencer(
            params.budget_ms / 1000.0,
            params.max_consecutive_misses,
            settings.max_backlog_frames,
            chained=self.flow_control,
        )
        self._wake = asyncio.Event()
        self.ending = Ending(self._wake.set)
        self.audio = SessionAudio(params, settings.resample_quality)
        self.text = TextHook(settings.text_policy, session_id, metrics)
        self.writer = ReplyWriter(
            context, self.seq, self.audio, self.text, metrics, self._started_wall
        )
        ctx = LinkContext(session_id, params, settings, metrics, metadata, lease, admission, trace)
        self.links: list[StageLink] = [stage.link(stage, ctx) for stage in pipeline.stages]
        # The client does not read our replies: stop reading it (gRPC flow control).
        self._room = asyncio.Event()
        self._room.set()
        # INPUT_PACING_FLOW_CONTROL: the client reader waits for room at the backends
        # (fewer than `flow_window_frames` frames outstanding) instead of dropping input.
        self._flow_window = max(1, min(settings.flow_window_frames, settings.max_backlog_frames))
        self._backend_room = asyncio.Event()
        self._backend_room.set()
        self._holding_input = False  # the reader waits for backend room (not client idle)
        self._input_done = False
        self._stop_input = False  # set at the maximum session length
        self._finalized = False
        self._tasks: list[asyncio.Task] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._last_client_msg = self.loop.time()

    # ----------------------------------------------------------------- backends

    async def open_backends(self) -> None:
        """Run the pipeline's start steps, then open every stage's stream."""
        ctx = self._open_ctx
        for step in self.pipeline.start:
            await step(ctx)
        for link in self.links:
            link.open(ctx)
        await asyncio.gather(*(link.send_open() for link in self.links))

    def cancel_backends(self) -> None:
        """Drop every backend stream (frees their slots); safe to call more than once."""
        for link in self.links:
            link.close()

    # ----------------------------------------------------------------- input

    def _spawn(self, coro, name: str) -> None:
        task = self.loop.create_task(coro, name=f"{name}:{self.session_id}")
        self._tasks.append(task)

    async def _read_client(self) -> None:
        ctx = self.context
        try:
            while True:
                request = await ctx.read()
                arrived = self.loop.time()  # the chunk's last byte is at the gateway
                if request is _EOF:
                    break
                self._last_client_msg = arrived
                kind = request.WhichOneof("kind")
                if kind != "audio":
                    raise OutOfOrder(
                        "SessionConfig may be sent only once, as the first message"
                        if kind == "config"
                        else "empty ConverseRequest: expected an audio chunk"
                    )
                for frame in self.audio.frames(request.audio.data):
                    await self._frame_in(frame, arrived)
                if self._stop_input:  # maximum session length: take no more input
                    break
            if not self._stop_input:  # end of the client stream: what the resampler held
                arrived = self.loop.time()
                for frame in self.audio.last_frames():
                    await self._frame_in(frame, arrived)
            self._input_done = True
            await self.links[0].input_done()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported through the session's end
            self.ending.fail(exc)
        finally:
            self._wake.set()

    async def _frame_in(self, frame: np.ndarray, arrived: float) -> None:
        """One complete input frame whose last byte reached the gateway at `arrived`."""
        seq = self.seq
        if seq.pending >= self.settings.max_pending_frames:
            self._room.clear()
            await self._room.wait()
        if self.flow_control:
            # Pre-recorded input: take the frame only when the backends have room, and stop
            # reading the client meanwhile (gRPC flow control paces it). Its clock starts
            # when the gateway takes it, or when the frame before it left (budget.py).
            while seq.outstanding >= self._flow_window:
                self._holding_input = True
                self._backend_room.clear()
                try:
                    await self._backend_room.wait()
                finally:
                    self._holding_input = False
                    self._last_client_msg = self.loop.time()
            arrived = self.loop.time()
        ticket = seq.add_frame(arrived)
        if not ticket.send:
            await self._flush()
            return
        await self.links[0].forward(ticket.index, self.loop.time(), frame)

    # ----------------------------------------------------------------- stages

    async def _read_stage(self, i: int) -> None:
        """Stage `i`'s answers, each to the client and/or the next stage, until its stream
        ends; then the next stage gets no more input."""
        link = self.links[i]
        nxt = self.links[i + 1] if i + 1 < len(self.links) else None
        moves = replies.MoveReport()
        seq = self.seq
        try:
            while (reply := await link.read()) is not None:
                for event in reply.events:
                    moves.moved(event, seq.frames_late)
                if reply.outcome is None:
                    continue
                failover = moves.answered(seq.frames_late)
                if failover is not None:
                    self.writer.queue([failover])
                await self._route(reply, nxt)
            failover = moves.answered(seq.frames_late)  # moved, but nothing left to answer
            if failover is not None:
                self.writer.queue([failover])
                await self._flush()
            if nxt is not None:
                await nxt.input_done()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported through the session's end
            self.ending.fail(exc)

    async def _route(self, reply: Reply, nxt: StageLink | None) -> None:
        out = reply.outcome
        frame = reply.frame
        if out.text:
            messages, end = self.text.piece(frame, out.text)
            self.writer.queue(messages)
            if end is not None:
                self.ending.fail(end)
            await self._flush()
        if out.forward is not None:
            if nxt is None:
                raise RuntimeError(f"pipeline {self.pipeline.name}: its last stage handed on")
            await nxt.forward(frame, reply.at, out.forward)
            return
        late_latency = self.seq.resolve(frame, out.pcm, reply.at)
        if late_latency is not None:  # given up as late before: its real latency counts
            self.metrics.frame_latency_seconds.observe(late_latency)
        await self._flush()

    # ----------------------------------------------------------------- output

    def _arm_timer(self, at: float | None) -> None:
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = None if at is None else self.loop.call_at(at, self._wake.set)

    async def _flush(self) -> None:
        """Write what can leave now (writer.py), then let input in again where there is room,
        and wake the pump at the end or arm the next deadline."""
        if not await self.writer.flush():
            return
        seq = self.seq
        if seq.pending < self.settings.max_pending_frames:
            self._room.set()
        if seq.outstanding < self._flow_window:
            self._backend_room.set()
        if seq.exceeded or (self._input_done and seq.pending == 0):
            self._wake.set()  # the pump ends the session
        else:
            self._arm_timer(seq.next_deadline())

    def _drained(self) -> bool:
        return self._input_done and self.seq.pending == 0 and not self.writer.outbox

    async def pump(self) -> None:
        """Start the readers, then wait for deadlines and the end of the conversation."""
        self._spawn(self._read_client(), "client")
        for i, link in enumerate(self.links):
            self._spawn(self._read_stage(i), link.stage.name)
            link.start_clock()
        seq = self.seq
        settings = self.settings
        writer = self.writer
        ending = self.ending
        idle_s = settings.idle_timeout_s
        idle_timer = None
        idle_at = 0.0
        # Maximum session length: stop taking input, let the frames in flight come back (for
        # at most the per-frame budget plus a margin), then end with DEADLINE_EXCEEDED.
        limit_timer = None
        give_up_at = None
        if settings.max_session_s > 0:

            def _limit() -> None:
                self._stop_input = True
                self._wake.set()

            limit_timer = self.loop.call_later(settings.max_session_s, _limit)
        try:
            while True:
                self._wake.clear()
                await self._flush()
                if self._stop_input:
                    now = self.loop.time()
                    if give_up_at is None:
                        give_up_at = now + self.params.budget_ms / 1000.0 + 0.5
                        limit_timer = self.loop.call_at(give_up_at, self._wake.set)
                    drained = self._drained()
                    if drained and writer.flushing:
                        await writer.idle.wait()  # see the clean end below
                        continue
                    if drained or now >= give_up_at:
                        raise ending.end(
                            MaxSessionLength(
                                f"the session reached the maximum session length of "
                                f"{settings.max_session_s:g} s"
                            )
                        )
                if seq.exceeded:
                    raise ending.end(
                        BudgetExceeded(
                            f"{seq.consecutive_misses} consecutive frames missed the "
                            f"{self.params.budget_ms} ms per-frame budget; ending the session"
                        )
                    )
                if ending.failure is not None:
                    raise ending.end(ending.failure)
                if self._drained():
                    if writer.flushing:
                        # Another task is still writing the last replies (its flush took
                        # them from the sequencer): the summary must come after them.
                        await writer.idle.wait()
                        continue
                    ending.complete()
                    return
                if not self._input_done and idle_s > 0:
                    now = self.loop.time()
                    if self._holding_input:  # we are not reading the client: not idle
                        self._last_client_msg = now
                    if now - self._last_client_msg >= idle_s:
                        raise ending.end(IdleTimeout(f"no audio from the client for {idle_s:g} s"))
                    if now >= idle_at:  # (re-)arm the idle check; cheap: once per period
                        idle_at = self._last_client_msg + idle_s
                        idle_timer = self.loop.call_at(idle_at, self._wake.set)
                await self._wake.wait()
        finally:
            if idle_timer is not None:
                idle_timer.cancel()
            if limit_timer is not None:
                limit_timer.cancel()

    # ----------------------------------------------------------------- end

    def summary(self) -> gateway_pb2.SessionSummary:
        """The session's totals. The first call closes the latency books: late frames whose
        output never came count with their latency so far (a lower bound)."""
        if not self._finalized:
            self._finalized = True
            for latency in self.seq.finalize(self.loop.time()):
                self.metrics.frame_latency_seconds.observe(latency)
        duration_s = time.monotonic() - self._started_wall
        return replies.summary(self.seq, self.ending.reason.value, duration_s)

    def audio_duration_s(self) -> float:
        return self.seq.frames_out * FRAME_S

    async def finish(self, timeout_s: float = 0.5) -> None:
        """After a clean end: let the backend streams close on their own (their readers see
        end-of-stream) instead of dropping them, within a short timeout."""
        readers = [t for t in self._tasks if not t.done()]
        if readers:
            await asyncio.wait(readers, timeout=timeout_s)

    async def close(self) -> None:
        """Stop the readers, drop the backend streams, cancel the deadline timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.cancel_backends()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - already reported through the ending
                pass
        self._room.set()
