"""One conversation: client audio -> codec Encode -> LM Step -> codec Decode -> client audio.

The pipeline is four small asyncio tasks around three backend streams, all pipelined (frame
t+1 goes out before frame t's output is back):

    client reader : read chunks, resample to 24 kHz, reframe to 1920, admit/drop, -> Encode
    encode reader : codes            -> LM Step
    lm reader     : text pieces      -> client (at once);  ready codes -> Decode,
                    not-ready steps  -> silence (initial acoustic delay, not a miss)
    decode reader : 24 kHz PCM       -> sequencer
    pump (handler): deadline timer, idle timeout, end of the session

Replies (text, events, audio frames in order, silence for frames past their deadline, see
`FrameSequencer`) are written by `_flush()`, called inline by whichever task made output
possible, one writer at a time: no extra task wake-up per frame.

LM failover (`lm_link.LmLink`, which owns the Step stream): when the LM stream fails or its
replica fails its health probe, the stream is re-opened on another LM replica and the
session's LM history replayed; the session carries on. Frames whose deadline passed while
moving are sent as silence (counted as late, and as `Failover.frames_lost`). The codec
streams are not moved: Mimi's streaming state is not cheaply replayable, so a codec failure
still ends the session with UNAVAILABLE.

Misses (the budget contract, true at the default settings): a frame given up at its deadline
(late) and a frame dropped for backlog while the oldest frame at the backends is past its
deadline (a stage not answering) both count toward the consecutive-miss streak; K in a row
end the session (DEADLINE_EXCEEDED). Independently, `_check_stages` watches each stage
(encode, step, decode): one that owes an answer and has not given any for the budget + K
frames' time ends the session even when no new input comes to be counted (DEADLINE_EXCEEDED,
or UNAVAILABLE when its replica also fails its health probe); the LM moves to another replica
after half of that. `_watch_health` treats a replica that fails its health probe while the
session waits on it as gone, for the codec and the LM alike. Input faster than real time is
dropped as overflow (not a miss). With INPUT_PACING_FLOW_CONTROL the client reader instead
waits for room at the backends (gRPC flow control pushes back on the client): nothing is
dropped, and the idle timeout does not count that wait.

Backend streams are per session or shared multiplexed streams (`--backend-streams`, see
gateway/streams.py: the same interface and failure semantics either way). The codec streams
are opened by `_open_codec`, the LM stream by its `LmLink`, so that a failover can re-open
the LM stream on another replica without touching the rest. Every stage remembers which gateway frame each
backend message belongs to (FIFO queues: streams answer in order), because backend frame
indices skip dropped frames.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import grpc
import numpy as np

from moshi_grpc import audio
from moshi_grpc.services.common import tracing
from moshi_grpc.services.common.errors import (
    BackendUnavailable,
    BudgetExceeded,
    CapacityExhausted,
    ErrorCode,
    IdleTimeout,
    InvalidInput,
    OutOfOrder,
    ServiceError,
)
from moshi_grpc.services.common.metrics import GatewayMetrics
from moshi_grpc.services.gateway.budget import Cause, Emission, FrameSequencer, StageWatch
from moshi_grpc.services.gateway.config import GatewaySettings, SessionParams
from moshi_grpc.services.gateway.lm_link import LmLink
from moshi_grpc.services.gateway.replicas import Lease, Replica, ReplicaPool
from moshi_grpc.services.gateway.streams import (
    DECODE,
    ENCODE,
    RetryableCapacity,
    backend_error,
    guarded_write,
    open_stream,
)
from moshi_grpc.services.gateway.text_policy import Action, TextGuard, TextPolicyEnded
from moshi_grpc.v1 import codec_pb2, gateway_pb2

log = logging.getLogger(__name__)

_EOF = grpc.aio.EOF

# Summary reason -> `moshi_gateway_sessions_ended_total{reason}` label.
ENDED_LABEL = {
    "client_closed": "completed",
    "deadline_exceeded": "budget_exceeded",
    "backend_failed": "backend_error",
    "cancelled": "cancelled",
    "idle_timeout": "idle_timeout",
    "draining": "draining",
    "error": "error",
    "max_session_length": "max_session_length",
    "text_policy": "text_policy",
}

__all__ = ["ENDED_LABEL", "MaxSessionLength", "RetryableCapacity", "Session", "StageStalled"]


class StageStalled(ServiceError):
    """A backend stage stopped answering for K frames' time (its replica still looks
    healthy, or the session could not move): the session cannot keep its budget."""

    code = ErrorCode.TIMED_OUT


class MaxSessionLength(ServiceError):
    """The session reached the gateway's maximum session length."""

    code = ErrorCode.TIMED_OUT


class Session:
    """Runs one admitted conversation until it ends; `run()` raises the final error, if any."""

    def __init__(
        self,
        *,
        session_id: str,
        params: SessionParams,
        lease: Lease,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        context: grpc.aio.ServicerContext,
        metadata: tuple[tuple[str, str], ...] = (),
        pool: ReplicaPool | None = None,
        trace: tracing.SessionTrace = tracing.NOOP_SESSION,
    ) -> None:
        self.session_id = session_id
        self.trace = trace  # spans of the session and its backend streams (no-op when off)
        self.pool = pool
        self.params = params
        self.lease = lease
        self.settings = settings
        self.metrics = metrics
        self.context = context
        self.metadata = metadata
        self.loop = asyncio.get_running_loop()
        self.seq = FrameSequencer(
            params.budget_ms / 1000.0,
            params.max_consecutive_misses,
            settings.max_backlog_frames,
            chained=params.input_pacing == gateway_pb2.INPUT_PACING_FLOW_CONTROL,
        )
        quality = settings.resample_quality
        self._in_resampler = audio.StreamResampler(params.sample_rate, audio.MODEL_RATE, quality)
        self._reframer = audio.Reframer(audio.FRAME_SIZE)
        self._out_resampler = audio.FrameResampler(params.sample_rate, quality)
        # Client bytes <-> samples; stateful for Ogg Opus (one stream per direction).
        self._decoder = audio.StreamDecoder(params.encoding, params.sample_rate)
        self._encoder = audio.StreamEncoder(params.encoding, params.sample_rate)
        # The text safety hook (settings.text_policy), one guard per session.
        self._text_guard = None
        if settings.text_policy is not None:
            count = metrics.text_policy_actions
            self._text_guard = TextGuard(
                settings.text_policy, session_id, lambda a: count.labels(a.value).inc()
            )
        self._silence = np.zeros(audio.FRAME_SIZE, np.float32)
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        # INPUT_PACING_FLOW_CONTROL: the client reader waits for room at the backends
        # (fewer than `flow_window_frames` frames outstanding) instead of dropping input.
        self.flow_control = params.input_pacing == gateway_pb2.INPUT_PACING_FLOW_CONTROL
        self._flow_window = max(1, min(settings.flow_window_frames, settings.max_backlog_frames))
        self._backend_room = asyncio.Event()
        self._backend_room.set()
        self._holding_input = False  # the reader waits for backend room (not client idle)
        self._ending = False  # an error ending: no more replies, the summary comes next
        # Stalled-stage rule: a stage not answering for the budget + K frames' time (when K
        # misses in a row would have been counted, had the client kept sending) ends the
        # session (K = 0: never). A stage that answers within the budget is never stalled.
        k = params.max_consecutive_misses
        frame_s = audio.FRAME_SIZE / audio.MODEL_RATE
        self._stage_limit_s = params.budget_ms / 1000.0 + k * frame_s if k > 0 else 0.0
        self._watch = StageWatch(("encode", "step", "decode"), self._stage_limit_s)
        self._stage_timer: asyncio.TimerHandle | None = None
        self._finalized = False
        self._outbox: list[gateway_pb2.ConverseResponse] = []
        self._flushing = False
        self._flush_idle = asyncio.Event()  # set while no `_flush()` is writing
        self._flush_idle.set()
        self._dirty = False
        self._failure: BaseException | None = None
        self._input_done = False
        self._stop_input = False  # set at the maximum session length
        # FIFO of (gateway frame index, time sent) per codec stage (the LM's is in `lm`).
        self._enc_q: deque[tuple[int, float]] = deque()
        self.lm = LmLink(
            session_id=session_id,
            params=params,
            lease=lease,
            settings=settings,
            metrics=metrics,
            metadata=metadata,
            pool=pool,
            trace=trace,
            watch=self._watch,
            seq=self.seq,
            emit=self._emit,
            input_done=lambda: self._input_done,
        )
        self._closing = False
        self._health_timer: asyncio.TimerHandle | None = None
        self._dec_q: deque[tuple[int, float]] = deque()
        self._enc_index = 0
        self._dec_index = 0
        self._enc_call = None
        self._dec_call = None
        self._tasks: list[asyncio.Task] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._last_client_msg = self.loop.time()
        self._started_wall = time.monotonic()
        self._first_audio_sent = False
        self._audio_frames_sent = 0
        self.reason = "cancelled"

    # ----------------------------------------------------------------- backend streams

    def _open_codec(self) -> None:
        codec = self.lease.codec
        mode = self.settings.backend_streams
        enc = self.trace.stream("encode", codec.address, mode)
        dec = self.trace.stream("decode", codec.address, mode)
        coalesce_s = self.settings.mux_coalesce_ms / 1000.0
        self._enc_call = open_stream(codec, ENCODE, enc.metadata(self.metadata), mode, coalesce_s)
        self._dec_call = open_stream(codec, DECODE, dec.metadata(self.metadata), mode, coalesce_s)
        codec_open = codec_pb2.CodecOpen(session_id=self.session_id)
        self._codec_opens = (enc.stamp(codec_open), dec.stamp(codec_open))

    @property
    def failovers(self) -> int:
        """LM moves so far."""
        return self.lm.failovers

    async def open_backends(self) -> None:
        """Open the three streams and send their `open` messages."""
        self._open_codec()
        self.lm.open()
        enc_open, dec_open = self._codec_opens
        await asyncio.gather(
            self._guarded_write(self.lease.codec, "encode", self._enc_call, enc_open, True),
            self._guarded_write(self.lease.codec, "decode", self._dec_call, dec_open, True),
            self.lm.send_open(),
        )

    async def _guarded_write(
        self, replica: Replica, stage: str, call, message, is_open: bool = False
    ) -> None:
        """Send a frame (or the `open`) on a backend stream; its failure -> the session's."""
        await guarded_write(replica, stage, call, message, self.settings.retry_after_ms, is_open)

    def cancel_backends(self) -> None:
        """Cancel every backend stream (frees their slots); safe to call more than once."""
        self._closing = True
        for call in (self._enc_call, self._dec_call):
            if call is not None and not call.done():
                call.cancel()
        self.lm.cancel()

    # ----------------------------------------------------------------- tasks

    def _emit(self, message: gateway_pb2.ConverseResponse) -> None:
        """Queue a reply for the next `_flush()` (which swaps the list for a new one)."""
        self._outbox.append(message)

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self._wake.set()

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
                try:
                    samples = self._decoder.decode(request.audio.data)
                except audio.AudioFormatError as exc:
                    raise InvalidInput(str(exc)) from None
                for frame in self._reframer.push(self._in_resampler.process(samples)):
                    await self._frame_in(frame, arrived)
                if self._stop_input:  # maximum session length: take no more input
                    break
            if not self._stop_input:
                # End of the client stream: flush the resampler, pad the last partial frame.
                arrived = self.loop.time()
                for frame in self._reframer.push(self._in_resampler.flush()):
                    await self._frame_in(frame, arrived)
                last = self._reframer.flush()
                if last is not None:
                    await self._frame_in(last, arrived)
            self._input_done = True
            await self._guarded_done_writing(self._enc_call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported through the session's end
            self._fail(exc)
        finally:
            self._wake.set()

    async def _guarded_done_writing(self, call) -> None:
        try:
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the reader of that stream reports the failure

    async def _frame_in(self, frame: np.ndarray, arrived: float) -> None:
        """One complete input frame whose last byte reached the gateway at `arrived`."""
        seq = self.seq
        if seq.pending >= self.settings.max_pending_frames:
            # The client does not read our replies: stop reading it (gRPC flow control).
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
        now = self.loop.time()
        self._enc_q.append((ticket.index, now))
        self._watch.sent("encode", now)
        index = self._enc_index
        self._enc_index += 1
        # The frame as a dict of PcmFrame fields: built once, inside the stream's request.
        request = {"index": index, "pcm_f32le": audio.array_to_f32le(frame)}
        await self._guarded_write(self.lease.codec, "encode", self._enc_call, request)

    async def _read_encode(self) -> None:
        call = self._enc_call
        stage = self.metrics.stage_seconds.labels("encode")
        try:
            while True:
                msg = await call.read()
                if msg is _EOF:
                    break
                gw, sent = self._enc_q.popleft()
                now = self.loop.time()
                self._watch.answered("encode", now)
                stage.observe(now - sent)
                await self.lm.forward(gw, now, msg.codes)
            self._check_clean_end(call, "encode", self.lease.codec)
            await self.lm.input_done()
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            self._fail(backend_error(self.lease.codec, "encode", exc, self.settings.retry_after_ms))
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    async def _read_lm(self) -> None:
        try:
            if await self.lm.run(self._lm_answer):
                await self._flush()  # the failover event
            await self._guarded_done_writing(self._dec_call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    async def _lm_answer(self, gw: int, now: float, msg) -> None:
        """One LM step answered at `now` (already in the history): its text piece to the
        client at once, its codes to the decoder, or silence while the LM is not ready."""
        if msg.text_piece:
            text = msg.text_piece.replace("\u2581", " ")
            if self._text_guard is not None:
                text = self._police_text(gw, text)
            if text is not None:
                # (self._outbox, not a local: `_flush` swaps the list for a new one)
                self._outbox.append(
                    gateway_pb2.ConverseResponse(
                        text=gateway_pb2.TextPiece(frame_index=gw, text=text)
                    )
                )
            await self._flush()
        if msg.ready:
            self._dec_q.append((gw, now))
            self._watch.sent("decode", now)
            index = self._dec_index
            self._dec_index += 1
            request = {"index": index, "codes": msg.moshi_codes}  # a CodesFrame
            await self._guarded_write(self.lease.codec, "decode", self._dec_call, request)
        else:
            self._resolved(gw, None, now)
            await self._flush()

    # ----------------------------------------------------------------- stage watch

    def _resolved(self, gw: int, pcm, now: float) -> None:
        """Frame `gw` is answered (decoded PCM, or None: LM not ready)."""
        late_latency = self.seq.resolve(gw, pcm, now)
        if late_latency is not None:  # given up as late before: its real latency counts
            self.metrics.frame_latency_seconds.observe(late_latency)

    def _silent_for(self, now: float, *stages: str) -> float:
        """How long the longest-silent of `stages` has owed an answer (0: owes nothing)."""
        since = [s for s in map(self._watch.silent_since, stages) if s is not None]
        return now - min(since) if since else 0.0

    def _watch_health(self) -> None:
        """Periodic: a replica that fails its health probe while the session waits on it
        (frames outstanding there, unanswered for a probe interval) is treated as gone. The
        LM call is abandoned (its reader fails over, or ends the session UNAVAILABLE); a
        codec replica cannot be replaced, so the session ends UNAVAILABLE. Both stages are
        watched the same way, and by the stalled-stage rule (`_check_stages`)."""
        self._health_timer = None
        if self._closing or self._failure is not None:
            return
        interval = max(0.05, self.settings.refresh_interval_s)
        now = self.loop.time()
        lm = self.lease.lm
        if lm.failures > 0 and not lm.healthy and self._silent_for(now, "step") >= interval:
            self.lm.abandon("stopped answering health checks")
        codec = self.lease.codec
        if (
            codec.failures > 0
            and not codec.healthy
            and self._silent_for(now, "encode", "decode") >= interval
        ):
            self._fail(
                BackendUnavailable(f"codec replica {codec.address} stopped answering health checks")
            )
            return
        self._health_timer = self.loop.call_later(interval, self._watch_health)

    def _check_stages(self) -> None:
        """The stalled-stage rule. A stage with frames outstanding that has not answered for
        the budget + K frames' time (K = the session's max_consecutive_misses; 0 = off) ends
        the session: DEADLINE_EXCEEDED, or UNAVAILABLE when its replica also fails its health
        probe. The LM moves to another replica (failover) after half of that, when one has a
        free slot. Misses alone cannot be relied on for this: a client that stops sending
        gives no frame to count."""
        self._stage_timer = None
        limit = self._stage_limit_s
        if self._closing or self._failure is not None or limit <= 0:
            return
        now = self.loop.time()
        watch = self._watch
        lm = self.lease.lm
        can_move = self.lm.can_move
        if can_move and self._silent_for(now, "step") >= limit / 2:
            if self.pool.failover_lm(lm) is not None:
                self.lm.abandon(f"has not answered for {self._silent_for(now, 'step'):.1f} s")
        stage = watch.stalled(now)
        if stage is not None and not self.lm.moving:
            replica = lm if stage == "step" else self.lease.codec
            what = (
                f"{replica.kind} replica {replica.address} ({stage}) has not answered for "
                f"{self._silent_for(now, stage):.1f} s (the {self.params.budget_ms} ms budget "
                f"+ {self.params.max_consecutive_misses} frames' time)"
            )
            if replica.failures > 0 and not replica.healthy:
                self._fail(BackendUnavailable(f"{what} and fails its health checks"))
            else:
                self._fail(StageStalled(f"{what}; ending the session"))
            return
        # Next check: when a stage could reach its limit (the LM: half of it while a move is
        # still possible and not yet due; nothing owed: a whole limit from now at least).
        times = []
        for st in ("encode", "step", "decode"):
            since = watch.silent_since(st)
            if since is None:
                continue
            half = st == "step" and can_move and now - since < limit / 2
            times.append(since + (limit / 2 if half else limit))
        at = min(times) if times else now + (limit / 2 if can_move else limit)
        self._stage_timer = self.loop.call_at(max(at, now + 0.01), self._check_stages)

    async def _read_decode(self) -> None:
        call = self._dec_call
        stage = self.metrics.stage_seconds.labels("decode")
        try:
            while True:
                msg = await call.read()
                if msg is _EOF:
                    break
                gw, sent = self._dec_q.popleft()
                now = self.loop.time()
                self._watch.answered("decode", now)
                stage.observe(now - sent)
                pcm = audio.f32le_to_array(msg.pcm_f32le)
                if pcm.size != audio.FRAME_SIZE:
                    raise BackendUnavailable(
                        f"codec replica {self.lease.codec.address} returned {pcm.size} samples "
                        f"instead of {audio.FRAME_SIZE}"
                    )
                self._resolved(gw, pcm, now)
                await self._flush()
            self._check_clean_end(call, "decode", self.lease.codec)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            self._fail(backend_error(self.lease.codec, "decode", exc, self.settings.retry_after_ms))
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _check_clean_end(self, call, stage: str, replica: Replica) -> None:
        """A backend stream that ends while we still expect answers has failed."""
        if not self._input_done:
            raise BackendUnavailable(
                f"{replica.kind} replica {replica.address} ({stage}) closed the stream early"
            )

    # ----------------------------------------------------------------- output

    def _arm_timer(self, at: float | None) -> None:
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = None if at is None else self.loop.call_at(at, self._wake.set)

    def _police_text(self, gw: int, text: str) -> str | None:
        """The text policy's verdict on one piece: the text to send (None: none), with its
        TextPolicyApplied event queued first; `end` fails the session."""
        verdict = self._text_guard.on_text(gw, text)
        d = verdict.decision
        if d.action is Action.PASS:
            return text
        self._outbox.append(
            gateway_pb2.ConverseResponse(
                event=gateway_pb2.Event(
                    text_policy=gateway_pb2.TextPolicyApplied(
                        frame_index=gw,
                        action=d.action.value,
                        rule=d.rule,
                        mute_frames=d.mute_frames if d.action is Action.MUTE else 0,
                    )
                )
            )
        )
        log.info("text policy: %s at frame %d (%s)", d.action.value, gw, d.rule)
        if verdict.end_reason is not None:
            self._fail(TextPolicyEnded(verdict.end_reason))
        return verdict.text

    def _audio_message(self, e: Emission) -> gateway_pb2.ConverseResponse:
        muted = self._text_guard is not None and self._text_guard.muted(e.index)
        pcm = e.pcm if e.pcm is not None and not muted else self._silence
        out = self._out_resampler.process(pcm)
        # Filled in place: a nested constructor would build the AudioOut and copy it.
        message = gateway_pb2.ConverseResponse()
        audio_out = message.audio
        audio_out.frame_index = e.index
        audio_out.data = self._encoder.encode(out)
        audio_out.silence = e.pcm is None or muted
        return message

    async def _send(self, emissions: list[Emission]) -> None:
        write = self.context.write
        m = self.metrics
        seq = self.seq
        loop = self.loop
        dropped_run: list[int] = []
        for i, e in enumerate(emissions):
            cause = e.cause
            if cause is Cause.LATE:
                m.budget_misses.inc()
                m.frames_dropped.labels("budget").inc()
                await write(
                    gateway_pb2.ConverseResponse(
                        event=gateway_pb2.Event(
                            budget_missed=gateway_pb2.BudgetMissed(
                                frame_index=e.index, late_ms=e.late_ms, consecutive=e.consecutive
                            )
                        )
                    )
                )
            elif cause is Cause.DROPPED and not dropped_run:
                # One event per run of consecutive dropped frames (same reason) in this batch.
                run = [e.index]
                for nxt in emissions[i + 1 :]:
                    if (
                        nxt.cause is not Cause.DROPPED
                        or nxt.index != run[-1] + 1
                        or nxt.stalled != e.stalled
                    ):
                        break
                    run.append(nxt.index)
                dropped_run = run
                m.frames_dropped.labels("stalled" if e.stalled else "overflow").inc(len(run))
                await write(
                    gateway_pb2.ConverseResponse(
                        event=gateway_pb2.Event(
                            frames_dropped=gateway_pb2.FramesDropped(
                                first_frame_index=run[0],
                                count=len(run),
                                reason="backend_stalled" if e.stalled else "backlog_full",
                            )
                        )
                    )
                )
            if dropped_run and dropped_run[-1] == e.index:
                dropped_run = []
            await write(self._audio_message(e))
            latency = seq.written(e, loop.time())
            m.frames.inc()
            self._audio_frames_sent += 1
            if latency is not None:
                m.frame_latency_seconds.observe(latency)
            if not self._first_audio_sent:
                self._first_audio_sent = True
                m.time_to_first_audio_seconds.observe(time.monotonic() - self._started_wall)

    async def _flush(self) -> None:
        """Write everything that can leave now: text, events, audio frames in order.

        Called inline by whichever task just made output possible (a backend answer, a
        dropped frame, the deadline timer through the pump), so a frame's reply goes out
        without waking another task. One writer at a time: a call that finds a flush in
        progress only marks it dirty, and the running flush loops once more.
        """
        if self._flushing:
            self._dirty = True
            return
        if self._ending:  # an error ending: the summary is the next and last reply
            return
        self._flushing = True
        self._flush_idle.clear()
        seq = self.seq
        try:
            while True:
                self._dirty = False
                if self._outbox:
                    pending, self._outbox = self._outbox, []
                    for msg in pending:
                        await self.context.write(msg)
                emissions = seq.poll(self.loop.time())
                if emissions:
                    await self._send(emissions)
                if not self._dirty:
                    break
        finally:
            self._flushing = False
            self._flush_idle.set()
        if seq.pending < self.settings.max_pending_frames:
            self._room.set()
        if seq.outstanding < self._flow_window:
            self._backend_room.set()
        if seq.exceeded or (self._input_done and seq.pending == 0):
            self._wake.set()  # the pump ends the session
        else:
            self._arm_timer(seq.next_deadline())

    async def pump(self) -> None:
        """Start the readers, then wait for deadlines and the end of the conversation."""
        self._spawn(self._read_client(), "client")
        self._spawn(self._read_encode(), "encode")
        self._spawn(self._read_lm(), "lm")
        self._spawn(self._read_decode(), "decode")
        seq = self.seq
        settings = self.settings
        idle_s = settings.idle_timeout_s
        idle_timer = None
        idle_at = 0.0
        if self.pool is not None:
            self._watch_health()
        self._check_stages()
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
                    drained = self._input_done and seq.pending == 0 and not self._outbox
                    if drained and self._flushing:
                        await self._flush_idle.wait()  # see the clean end below
                        continue
                    if drained or now >= give_up_at:
                        self.reason = "max_session_length"
                        raise MaxSessionLength(
                            f"the session reached the maximum session length of "
                            f"{settings.max_session_s:g} s"
                        )
                if seq.exceeded:
                    self.reason = "deadline_exceeded"
                    raise BudgetExceeded(
                        f"{seq.consecutive_misses} consecutive frames missed the "
                        f"{self.params.budget_ms} ms per-frame budget; ending the session"
                    )
                if self._failure is not None:
                    exc = self._failure
                    if isinstance(exc, StageStalled):
                        self.reason = "deadline_exceeded"
                    elif isinstance(exc, TextPolicyEnded):
                        self.reason = "text_policy"
                    elif isinstance(exc, BackendUnavailable | CapacityExhausted):
                        self.reason = "backend_failed"
                    else:
                        self.reason = "error"
                    raise exc
                if self._input_done and seq.pending == 0 and not self._outbox:
                    if self._flushing:
                        # Another task is still writing the last replies (its flush took
                        # them from the sequencer): the summary must come after them.
                        await self._flush_idle.wait()
                        continue
                    self.reason = "client_closed"
                    return
                if not self._input_done and idle_s > 0:
                    now = self.loop.time()
                    if self._holding_input:  # we are not reading the client: not idle
                        self._last_client_msg = now
                    if now - self._last_client_msg >= idle_s:
                        self.reason = "idle_timeout"
                        raise IdleTimeout(f"no audio from the client for {idle_s:g} s")
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
        seq = self.seq
        if not self._finalized:
            self._finalized = True
            for latency in seq.finalize(self.loop.time()):
                self.metrics.frame_latency_seconds.observe(latency)
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
            duration_s=time.monotonic() - self._started_wall,
            reason=self.reason,
        )

    async def quiesce(self, timeout_s: float) -> bool:
        """An error ending: stop writing replies and wait (at most `timeout_s`) for a write
        in progress to finish, so that the summary comes after it. False on timeout (a
        client that does not read: the summary could not be written either)."""
        self._ending = True
        if not self._flushing:
            return True
        try:
            await asyncio.wait_for(self._flush_idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def audio_duration_s(self) -> float:
        return self.seq.frames_out * audio.FRAME_SIZE / audio.MODEL_RATE

    async def finish(self, timeout_s: float = 0.5) -> None:
        """After a clean end: let the backend streams close on their own (their readers see
        end-of-stream) instead of cancelling them, within a short timeout."""
        readers = [t for t in self._tasks if not t.done()]
        if readers:
            await asyncio.wait(readers, timeout=timeout_s)

    async def close(self) -> None:
        """Stop the readers, cancel the backend streams and the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._health_timer is not None:
            self._health_timer.cancel()
            self._health_timer = None
        if self._stage_timer is not None:
            self._stage_timer.cancel()
            self._stage_timer = None
        self.cancel_backends()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - already reported through _fail
                pass
        self._room.set()
