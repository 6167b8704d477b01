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

LM failover: the gateway keeps the session's LM history (per step: the user codes sent and
the output received; at most `GatewaySettings.lm_history_steps` steps, the LM's context). When
the LM stream fails (UNAVAILABLE, connection lost, stream closed early) or its replica fails
its health probe, the Step stream is re-opened on another LM replica with a free slot, with
`LmOpen.replay` = that history (teacher-forced), and the frames that were sent but not
answered are sent again; the session carries on. Frames whose deadline passed while moving
are sent as silence (counted as late, and as `Failover.frames_lost`). The codec streams are
not moved: Mimi's streaming state is not cheaply replayable, so a codec failure still ends
the session with UNAVAILABLE.

Backend streams are per session or shared multiplexed streams (`--backend-streams`, see
gateway/streams.py: the same interface and failure semantics either way). Each backend
stream is opened by `_open_*` so that a failover can re-open the LM stream
on another replica without touching the rest. Every stage remembers which gateway frame each
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
from moshi_grpc.services.common.errors import (
    BackendUnavailable,
    BudgetExceeded,
    CapacityExhausted,
    IdleTimeout,
    InvalidInput,
    OutOfOrder,
    ServiceError,
)
from moshi_grpc.services.common.metrics import GatewayMetrics
from moshi_grpc.services.gateway.budget import Cause, Emission, FrameSequencer
from moshi_grpc.services.gateway.config import GatewaySettings, SessionParams
from moshi_grpc.services.gateway.history import LmHistory
from moshi_grpc.services.gateway.replicas import Lease, Replica, ReplicaPool
from moshi_grpc.services.gateway.streams import DECODE, ENCODE, STEP, open_stream
from moshi_grpc.v1 import codec_pb2, gateway_pb2, lm_pb2

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
}

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


class MaxSessionLength(ServiceError):
    """The session reached the gateway's maximum session length."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class RetryableCapacity(CapacityExhausted):
    """A backend refused the stream for lack of slots; the client may retry after a while."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


def backend_error(replica: Replica, stage: str, exc: grpc.aio.AioRpcError, retry_ms: int):
    """Map a backend stream's failure to the status the client gets."""
    code = exc.code()
    what = f"{replica.kind} replica {replica.address} ({stage})"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return RetryableCapacity(f"{what} has no free slot: {exc.details()}", retry_ms)
    return BackendUnavailable(f"{what} failed: {code.name}: {exc.details()}")


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
    ) -> None:
        self.session_id = session_id
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
        )
        quality = settings.resample_quality
        self._in_resampler = audio.StreamResampler(params.sample_rate, audio.MODEL_RATE, quality)
        self._reframer = audio.Reframer(audio.FRAME_SIZE)
        self._out_resampler = audio.FrameResampler(params.sample_rate, quality)
        self._silence = np.zeros(audio.FRAME_SIZE, np.float32)
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._outbox: list[gateway_pb2.ConverseResponse] = []
        self._flushing = False
        self._flush_idle = asyncio.Event()  # set while no `_flush()` is writing
        self._flush_idle.set()
        self._dirty = False
        self._failure: BaseException | None = None
        self._input_done = False
        self._stop_input = False  # set at the maximum session length
        # FIFO of (gateway frame index, time sent) per backend stage.
        self._enc_q: deque[tuple[int, float]] = deque()
        # LM steps sent and not answered yet: (gateway frame, time sent, user codes).
        self._lm_q: deque[tuple[int, float, object]] = deque()
        # Answered LM steps, for replay on failover.
        lm_info = lease.lm.info
        self._lm_history = LmHistory(
            max(1, settings.lm_history_steps),
            lm_info.num_codebooks if lm_info is not None and lm_info.num_codebooks else None,
        )
        self._lm_index = 0  # next frame index on the current LM stream
        self._lm_moving = False
        self._lm_writes_done = False
        self._lm_abandoned = None  # an LM call we cancelled because its replica is unhealthy
        self._closing = False
        self.failovers = 0
        self._failover_note: tuple[str, str, int] | None = None  # from, to, late at the move
        self._health_timer: asyncio.TimerHandle | None = None
        self._dec_q: deque[tuple[int, float]] = deque()
        self._enc_index = 0
        self._dec_index = 0
        self._enc_call = None
        self._dec_call = None
        self._lm_call = None
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
        self._enc_call = open_stream(codec, ENCODE, self.metadata, mode)
        self._dec_call = open_stream(codec, DECODE, self.metadata, mode)

    def _open_lm(self, replay: list[lm_pb2.ReplayStep] | None = None) -> None:
        self._lm_call = open_stream(
            self.lease.lm, STEP, self.metadata, self.settings.backend_streams
        )
        self._lm_open = lm_pb2.LmOpen(
            session_id=self.session_id,
            sampling=self.params.sampling,
            seed=self.params.seed,
            replay=replay or [],
        )

    async def open_backends(self) -> None:
        """Open the three streams and send their `open` messages."""
        self._open_codec()
        self._open_lm()
        codec_open = codec_pb2.CodecOpen(session_id=self.session_id)
        await asyncio.gather(
            self._guarded_write(self.lease.codec, "encode", self._enc_call, codec_open, True),
            self._guarded_write(self.lease.codec, "decode", self._dec_call, codec_open, True),
            self._guarded_write(self.lease.lm, "step", self._lm_call, self._lm_open, True),
        )

    async def _guarded_write(
        self, replica: Replica, stage: str, call, message, is_open: bool = False
    ) -> None:
        """Send a frame (or the `open`) on a backend stream; its failure -> the session's."""
        try:
            if is_open:
                await call.open(message)
            else:
                await call.send(message)
        except grpc.aio.AioRpcError as exc:
            raise backend_error(replica, stage, exc, self.settings.retry_after_ms) from None
        except asyncio.InvalidStateError:
            # The call already ended: its status says why.
            code = await call.code()
            details = await call.details()
            raise backend_error(
                replica,
                stage,
                grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details),
                self.settings.retry_after_ms,
            ) from None

    def cancel_backends(self) -> None:
        """Cancel every backend stream (frees their slots); safe to call more than once."""
        self._closing = True
        for call in (self._enc_call, self._dec_call, self._lm_call):
            if call is not None and not call.done():
                call.cancel()

    # ----------------------------------------------------------------- tasks

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self._wake.set()

    def _spawn(self, coro, name: str) -> None:
        task = self.loop.create_task(coro, name=f"{name}:{self.session_id}")
        self._tasks.append(task)

    async def _read_client(self) -> None:
        ctx = self.context
        encoding = self.params.encoding
        try:
            while True:
                request = await ctx.read()
                if request is _EOF:
                    break
                self._last_client_msg = self.loop.time()
                kind = request.WhichOneof("kind")
                if kind != "audio":
                    raise OutOfOrder(
                        "SessionConfig may be sent only once, as the first message"
                        if kind == "config"
                        else "empty ConverseRequest: expected an audio chunk"
                    )
                try:
                    samples = audio.decode_samples(request.audio.data, encoding)
                except audio.AudioFormatError as exc:
                    raise InvalidInput(str(exc)) from None
                for frame in self._reframer.push(self._in_resampler.process(samples)):
                    await self._frame_in(frame)
                if self._stop_input:  # maximum session length: take no more input
                    break
            if not self._stop_input:
                # End of the client stream: flush the resampler, pad the last partial frame.
                for frame in self._reframer.push(self._in_resampler.flush()):
                    await self._frame_in(frame)
                last = self._reframer.flush()
                if last is not None:
                    await self._frame_in(last)
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

    async def _frame_in(self, frame: np.ndarray) -> None:
        seq = self.seq
        if seq.pending >= self.settings.max_pending_frames:
            # The client does not read our replies: stop reading it (gRPC flow control).
            self._room.clear()
            await self._room.wait()
        now = self.loop.time()
        ticket = seq.add_frame(now)
        if not ticket.send:
            await self._flush()
            return
        self._enc_q.append((ticket.index, now))
        index = self._enc_index
        self._enc_index += 1
        request = codec_pb2.PcmFrame(index=index, pcm_f32le=audio.array_to_f32le(frame))
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
                stage.observe(now - sent)
                entry = (gw, now, msg.codes)
                self._lm_q.append(entry)
                if not self._lm_moving:
                    await self._write_lm(entry[2])
            self._check_clean_end(call, "encode", self.lease.codec)
            self._lm_writes_done = True
            if not self._lm_moving:
                await self._lm_done_writing()
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            self._fail(backend_error(self.lease.codec, "encode", exc, self.settings.retry_after_ms))
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    async def _write_lm(self, codes) -> None:
        """Send one frame of user codes on the current LM stream. A failed write is left to
        the LM reader, which sees the stream's error and fails over (or ends the session)."""
        request = lm_pb2.UserCodes(index=self._lm_index, codes=codes)
        self._lm_index += 1
        call = self._lm_call
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

    async def _lm_done_writing(self) -> None:
        call = self._lm_call
        try:
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        except asyncio.CancelledError:  # see _write_lm
            task = asyncio.current_task()
            if not call.cancelled() or (task is not None and task.cancelling()):
                raise

    async def _read_lm(self) -> None:
        try:
            while True:
                call = self._lm_call
                replica = self.lease.lm
                try:
                    await self._read_lm_stream(call)
                    self._check_clean_end(call, "step", replica)
                    break
                except grpc.aio.AioRpcError as exc:
                    error = backend_error(replica, "step", exc, self.settings.retry_after_ms)
                    if exc.code() not in FAILOVER_CODES and self._failover_note is None:
                        raise error from None
                except BackendUnavailable as exc:  # closed early
                    error = exc
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if self._lm_abandoned is not call or (task and task.cancelling()):
                        raise
                    error = BackendUnavailable(
                        f"lm replica {replica.address} (step) stopped answering health checks"
                    )
                if not await self._failover(replica):
                    if isinstance(error, RetryableCapacity):  # the replica moved to was full
                        error = BackendUnavailable(f"{error}; no LM replica left to move to")
                    raise error
            if self._failover_note is not None:  # moved, but nothing was left to answer
                self._announce_failover()
                await self._flush()
            await self._guarded_done_writing(self._dec_call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    async def _read_lm_stream(self, call) -> None:
        stage = self.metrics.stage_seconds.labels("step")
        outbox = self._outbox
        history = self._lm_history
        while True:
            msg = await call.read()
            if msg is _EOF:
                break
            gw, sent, codes = self._lm_q.popleft()
            now = self.loop.time()
            stage.observe(now - sent)
            if self._failover_note is not None:
                self._announce_failover()
            if msg.text_piece:
                text = msg.text_piece.replace("\u2581", " ")
                outbox.append(
                    gateway_pb2.ConverseResponse(
                        text=gateway_pb2.TextPiece(frame_index=gw, text=text)
                    )
                )
                await self._flush()
            if msg.ready:
                history.append(codes, msg.text_token, msg.moshi_codes)
                self._dec_q.append((gw, now))
                index = self._dec_index
                self._dec_index += 1
                request = codec_pb2.CodesFrame(index=index, codes=msg.moshi_codes)
                await self._guarded_write(self.lease.codec, "decode", self._dec_call, request)
            else:
                history.append(codes, None, ())
                self.seq.resolve(gw, None)
                await self._flush()

    # ----------------------------------------------------------------- LM failover

    def _watch_lm_health(self) -> None:
        """Periodic: an LM replica that fails its health probe (e.g. frozen: the stream just
        stops answering) is abandoned; cancelling its call makes the LM reader fail over."""
        self._health_timer = None
        if self._closing:
            return
        call = self._lm_call
        replica = self.lease.lm
        if (
            not self._lm_moving
            and replica.failures > 0
            and not replica.healthy
            and call is not None
            and not call.done()
            and self._lm_abandoned is not call
        ):
            log.warning("lm replica %s failed its health probe; failing over", replica.address)
            self._lm_abandoned = call
            call.cancel()
        self._health_timer = self.loop.call_later(
            max(0.05, self.settings.refresh_interval_s), self._watch_lm_health
        )

    async def _failover(self, failed: Replica) -> bool:
        """Move the LM stream to another replica with a free slot; False if none (or too many
        moves already, or the session is ending)."""
        if self._closing or self.pool is None or not self.settings.lm_failover:
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
        self._lm_moving = True
        try:
            old = self._lm_call
            if old is not None and not old.done():
                old.cancel()
            self.lease.move_lm(target)
            replay = self._lm_history.replay()
            late = self.seq.frames_late
            if self._failover_note is not None:  # a second move before the first answered
                late = self._failover_note[2]
            self._failover_note = (failed.address, target.address, late)
            self._open_lm(replay)
            self._lm_index = len(replay)
            try:
                await self._lm_call.open(self._lm_open)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return True  # the reader sees this stream's error and tries again
            i = 0
            while i < len(self._lm_q):  # frames sent to the failed replica, and newer ones
                await self._write_lm(self._lm_q[i][2])
                i += 1
            if self._lm_writes_done:
                await self._lm_done_writing()
        finally:
            self._lm_moving = False
        self.metrics.failovers.labels("lm", "ok").inc()
        log.warning(
            "lm failover %s -> %s: replayed %d steps, resent %d frames",
            failed.address,
            target.address,
            len(self._lm_history),
            len(self._lm_q),
        )
        return True

    def _announce_failover(self) -> None:
        """First answer from the new replica: tell the client how many frames were lost."""
        source, target, late = self._failover_note
        self._failover_note = None
        self._outbox.append(
            gateway_pb2.ConverseResponse(
                event=gateway_pb2.Event(
                    failover=gateway_pb2.Failover(
                        from_replica=source,
                        to_replica=target,
                        frames_lost=max(0, self.seq.frames_late - late),
                    )
                )
            )
        )

    async def _read_decode(self) -> None:
        call = self._dec_call
        stage = self.metrics.stage_seconds.labels("decode")
        try:
            while True:
                msg = await call.read()
                if msg is _EOF:
                    break
                gw, sent = self._dec_q.popleft()
                stage.observe(self.loop.time() - sent)
                pcm = audio.f32le_to_array(msg.pcm_f32le)
                if pcm.size != audio.FRAME_SIZE:
                    raise BackendUnavailable(
                        f"codec replica {self.lease.codec.address} returned {pcm.size} samples "
                        f"instead of {audio.FRAME_SIZE}"
                    )
                self.seq.resolve(gw, pcm)
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

    def _audio_message(self, e: Emission) -> gateway_pb2.ConverseResponse:
        pcm = e.pcm if e.pcm is not None else self._silence
        out = self._out_resampler.process(pcm)
        return gateway_pb2.ConverseResponse(
            audio=gateway_pb2.AudioOut(
                frame_index=e.index,
                data=audio.encode_samples(out, self.params.encoding),
                silence=e.pcm is None,
            )
        )

    async def _send(self, emissions: list[Emission]) -> None:
        write = self.context.write
        m = self.metrics
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
                # One event per run of consecutive dropped frames in this batch.
                run = [e.index]
                for nxt in emissions[i + 1 :]:
                    if nxt.cause is not Cause.DROPPED or nxt.index != run[-1] + 1:
                        break
                    run.append(nxt.index)
                dropped_run = run
                m.frames_dropped.labels("overflow").inc(len(run))
                await write(
                    gateway_pb2.ConverseResponse(
                        event=gateway_pb2.Event(
                            frames_dropped=gateway_pb2.FramesDropped(
                                first_frame_index=run[0], count=len(run), reason="backlog_full"
                            )
                        )
                    )
                )
            if dropped_run and dropped_run[-1] == e.index:
                dropped_run = []
            await write(self._audio_message(e))
            m.frames.inc()
            self._audio_frames_sent += 1
            if e.latency_s is not None:
                m.frame_latency_seconds.observe(e.latency_s)
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
        if self.pool is not None and settings.lm_failover:
            self._watch_lm_health()
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
                    if isinstance(exc, BackendUnavailable | CapacityExhausted):
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
        seq = self.seq
        p50, p95, p99 = seq.latency.percentiles_ms((50, 95, 99))
        return gateway_pb2.SessionSummary(
            frames_in=seq.frames_in,
            frames_out=seq.frames_out,
            frames_late=seq.frames_late,
            frames_dropped=seq.frames_dropped,
            latency_p50_ms=p50,
            latency_p95_ms=p95,
            latency_p99_ms=p99,
            duration_s=time.monotonic() - self._started_wall,
            reason=self.reason,
        )

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
