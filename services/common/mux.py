"""Serving a backend stage (codec Encode/Decode, LM Step) per session or multiplexed.

A *stage* says how one session of a streaming RPC is validated and answered: `open` checks
the open payload and takes a batch slot, `parse` checks one frame (nothing unchecked reaches
a batch), `respond` builds the per-frame answer. Both serving paths use the same stage, so
validation, error mapping (`status.status_for`), slot accounting and metrics exist once:

- `serve_stream`: the per-session RPCs (`Encode`, `Decode`, `Step`): one stream = one
  session = one slot.
- `serve_mux`: the multiplexed RPCs (`EncodeMux`, `DecodeMux`, `StepMux`): one stream
  carries entries of many sessions (open / frame / close / cancel, keyed by a session id the
  caller chose). Each session maps to its own slot of the same scheduler; its frames are
  submitted one at a time in order (`SlotHandle.submit_nowait` + a done callback: no task
  per session), and results of all sessions leave in one response message per wake-up of
  the writer (natural batching: everything ready when it runs, no timer). A session's error
  ends only that session (an `end` result with the status); the stream ends when the caller
  half-closes and every session is done, or when the replica drains and has no session left.
  However the stream ends, every session on it is freed (`release_all`, also from
  `context.add_done_callback`, which runs even when the handler is cancelled). The idle
  timeout applies to the stream while it holds sessions (no message for that long ends it);
  a stream with no session may stay quiet.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from moshi_grpc.services.common import logs, tracing
from moshi_grpc.services.common.batching import SlotHandle
from moshi_grpc.services.common.errors import Draining, InvalidInput, OutOfOrder
from moshi_grpc.services.common.request_streams import (
    check_index,
    check_known_fields,
    expect_frame,
    next_message,
    read_open,
)
from moshi_grpc.services.common.server import ServerState
from moshi_grpc.services.common.status import status_for
from moshi_grpc.v1 import common_pb2

log = logging.getLogger(__name__)

# How often an idle multiplexed stream looks at the replica's drain flag.
_IDLE_DRAIN_CHECK_S = 0.25
# Results per response message at most: 256 PCM frames are ~2 MB, well under the 4 MiB
# message limit, however long the caller was slow to read.
MAX_RESULTS_PER_MESSAGE = 256


@dataclass
class Opened:
    """One admitted session: its slot, an idempotent `close()` that frees it, and payloads
    to run before its first frame (the LM's prompt and replayed history): the stage says
    whether one is answered (`answer_preamble`: the LM's PromptReady)."""

    slot: SlotHandle
    close: Callable[[], None]
    preamble: Sequence[Any] = field(default_factory=tuple)
    # history steps the preamble replays (one LM prefill covers many): the session's first
    # frame index. None: one step per payload.
    replay_steps: int | None = None

    @property
    def history_len(self) -> int:
        return len(self.preamble) if self.replay_steps is None else self.replay_steps


class Stage(Protocol):
    """How one stage validates and answers a session (see the module docstring)."""

    what: str  # the per-session RPC's name, used in messages ("Encode", "Step")

    def open(self, opened: Any) -> Opened:
        """Validate the `open` payload and take a slot (ServiceError/ValueError if not)."""

    def parse(self, frame: Any) -> Any:
        """Validate one frame message and return the scheduler payload."""

    def respond(self, index: int, result: Any, timing: Any) -> Any:
        """The per-session response message for frame `index`."""

    def answer_preamble(self, payload: Any, result: Any, timing: Any) -> Any:
        """A preamble payload ran: count it, and the message that answers it, if any (the
        LM's PromptReady; None: nothing is sent)."""


async def serve_stream(
    stage: Stage,
    requests: AsyncIterator[Any],
    context: grpc.aio.ServicerContext,
    idle_timeout_s: float | None,
):
    """The per-session RPC: `open`, then frames answered one by one, then end."""
    what = stage.what
    first = await read_open(requests, idle_timeout_s, what)
    if first is None:
        return
    logs.bind_session(first.session_id)
    session = tracing.traced_open(stage, first, context)  # (a plain open when off)
    context.add_done_callback(lambda _ctx: session.close())
    log.info("%s stream opened (slot %d, replay %d)", what, session.slot.slot, session.history_len)
    index = 0
    try:
        for item in session.preamble:
            result, timing = await session.slot.submit(item)
            message = stage.answer_preamble(item, result, timing)
            if message is not None:
                yield message
        index = session.history_len
        while True:
            message = await next_message(requests, idle_timeout_s)
            if message is None:
                break
            frame = expect_frame(message, index, what)
            payload = stage.parse(frame)
            result, timing = await session.slot.submit(payload)
            yield stage.respond(frame.index, result, timing)
            index += 1
    finally:
        session.close()
        log.info("%s stream closed at frame %d", what, index)


class _ServedSession:
    """A session served on a backend's multiplexed stream: its slot and its frames not yet
    submitted (the gateway's handle on the same session is `gateway.streams.MuxedCall`)."""

    __slots__ = ("sid", "opened", "queue", "busy", "closing", "index", "ended")

    def __init__(self, sid: int, opened: Opened) -> None:
        self.sid = sid
        self.opened = opened
        # (frame index or None for a preamble payload, payload) not submitted yet.
        self.queue: deque[tuple[int | None, Any]] = deque((None, p) for p in opened.preamble)
        self.busy = False
        self.closing = False
        self.index = opened.history_len  # next expected frame index
        self.ended = False


class MuxServer:
    """One multiplexed stream on a backend: routes entries to per-session slots."""

    def __init__(
        self,
        stage: Stage,
        response_type: type,
        state: ServerState | None,
    ) -> None:
        self.stage = stage
        self.what = f"{stage.what}Mux"
        self.response_type = response_type
        self.state = state
        self.sessions: dict[int, _ServedSession] = {}
        self._out = response_type()
        self._full: deque[Any] = deque()  # responses that reached the cap, oldest first
        self._wake = asyncio.Event()
        self._input_done = False

    # -- entries --------------------------------------------------------------------------

    def handle(self, entry: Any) -> None:
        """Apply one entry; any error ends only its session (an `end` result)."""
        sid = entry.session
        session = self.sessions.get(sid)
        try:
            kind = entry.WhichOneof("kind")
            if kind == "frame":
                if session is None:
                    raise OutOfOrder(
                        f"{self.what}: frame for session {sid}, which is not open (frame "
                        "before open, or after its end)"
                    )
                if session.closing:
                    raise OutOfOrder(f"{self.what}: frame after close on session {sid}")
                frame = entry.frame
                check_index(frame.index, session.index)
                payload = self.stage.parse(frame)
                session.index += 1
                session.queue.append((frame.index, payload))
                if not session.busy:
                    self._submit(session)
            elif kind == "open":
                if session is not None:
                    raise OutOfOrder(f"second `open` for session {sid} on the {self.what} stream")
                if self.state is not None and self.state.draining:
                    raise Draining("server is draining (shutting down); retry on another replica")
                check_known_fields(entry.open, f"{self.what}.open")
                session = _ServedSession(sid, tracing.traced_open(self.stage, entry.open))
                self.sessions[sid] = session
                if session.queue:
                    self._submit(session)
            elif kind == "close":
                if session is not None:
                    session.closing = True
                    if not session.busy and not session.queue:
                        self._finish(session, 0, "")
            elif kind == "cancel":
                if session is not None:
                    self._drop(session)
            else:
                check_known_fields(entry, f"{self.what} entry")
                raise InvalidInput(
                    f"{self.what} entry for session {sid} sets none of open/frame/close/cancel"
                )
        except Exception as exc:  # noqa: BLE001 - mapped to this session's status
            self._fail(sid, session, exc)

    def _fail(self, sid: int, session: _ServedSession | None, exc: BaseException) -> None:
        code, message = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s session %d failed", self.what, sid, exc_info=exc)
        else:
            log.info("%s session %d -> %s: %s", self.what, sid, code.name, message)
        if session is not None and not session.ended:
            self._drop(session)
        self._end(sid, code.value[0], message)

    def _submit(self, session: _ServedSession) -> None:
        index, payload = session.queue.popleft()
        try:
            future = session.opened.slot.submit_nowait(payload)
        except Exception as exc:  # noqa: BLE001 - scheduler closed meanwhile
            self._fail(session.sid, session, exc)
            return
        session.busy = True
        preamble = payload if index is None else None
        future.add_done_callback(functools.partial(self._done, session, index, preamble))

    def _done(
        self, session: _ServedSession, index: int | None, preamble: Any, future: asyncio.Future
    ) -> None:
        session.busy = False
        if session.ended:
            return
        if future.cancelled():  # the scheduler closed under it (shutdown)
            self._fail(session.sid, session, Draining(f"{self.what}: replica shutting down"))
            return
        exc = future.exception()
        if exc is not None:
            self._fail(session.sid, session, exc)
            return
        result, timing = future.result()
        try:
            if index is None:
                message = self.stage.answer_preamble(preamble, result, timing)
            else:
                message = self.stage.respond(index, result, timing)
        except Exception as err:  # noqa: BLE001
            self._fail(session.sid, session, err)
            return
        if message is not None:
            self._add(session=session.sid, frame=message)
        if session.queue:
            self._submit(session)
        elif session.closing:
            self._finish(session, 0, "")

    def _end(self, sid: int, code: int, message: str) -> None:
        self._add(session=sid, end=common_pb2.MuxEnd(code=code, message=message))

    def _add(self, **result: Any) -> None:
        results = self._out.results
        results.add(**result)
        if len(results) >= MAX_RESULTS_PER_MESSAGE:
            self._full.append(self._out)
            self._out = self.response_type()
        self._wake.set()

    def _pending(self) -> bool:
        return bool(self._full) or bool(len(self._out.results))

    def _finish(self, session: _ServedSession, code: int, message: str) -> None:
        self._drop(session)
        self._end(session.sid, code, message)

    def _drop(self, session: _ServedSession) -> None:
        session.ended = True
        session.queue.clear()
        self.sessions.pop(session.sid, None)
        session.opened.close()
        if not self.sessions:
            self._wake.set()  # (a draining replica ends an empty stream)

    def release_all(self) -> None:
        """Free every session's slot (the stream is over, however it ended)."""
        for session in list(self.sessions.values()):
            session.ended = True
            session.opened.close()
        self.sessions.clear()

    # -- the stream -----------------------------------------------------------------------

    async def _read(self, requests: AsyncIterator[Any], idle_timeout_s: float | None) -> None:
        try:
            while True:
                # The idle timeout guards slots: a stream holding no session may stay quiet
                # (the gateway keeps its shared stream open between sessions).
                timeout = idle_timeout_s if self.sessions else None
                request = await next_message(requests, timeout)
                if request is None:
                    break
                for entry in request.entries:
                    self.handle(entry)
            # The caller half-closed: every session ends once its frames are answered.
            self._input_done = True
            for session in list(self.sessions.values()):
                session.closing = True
                if not session.busy and not session.queue:
                    self._finish(session, 0, "")
        finally:
            self._wake.set()

    async def serve(
        self,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        idle_timeout_s: float | None,
    ):
        context.add_done_callback(lambda _ctx: self.release_all())
        reader = asyncio.ensure_future(self._read(requests, idle_timeout_s))
        wake = self._wake
        state = self.state
        try:
            while True:
                if self.sessions or state is None:
                    await wake.wait()
                else:
                    try:  # idle stream: look at the drain flag now and then
                        await asyncio.wait_for(wake.wait(), _IDLE_DRAIN_CHECK_S)
                    except asyncio.TimeoutError:
                        pass
                wake.clear()
                if len(self._out.results):
                    self._full.append(self._out)
                    self._out = self.response_type()
                while self._full:
                    yield self._full.popleft()
                if reader.done():
                    reader.result()  # raises what ended the reading (idle timeout, ...)
                if self.sessions or self._pending():
                    continue  # (results may have come while the last response was sent)
                if reader.done():
                    return
                if state is not None and state.draining:
                    log.info("%s: replica draining, no session left: ending the stream", self.what)
                    return
        finally:
            reader.cancel()
            self.release_all()


async def serve_mux(
    stage: Stage,
    response_type: type,
    state: ServerState | None,
    requests: AsyncIterator[Any],
    context: grpc.aio.ServicerContext,
    idle_timeout_s: float | None,
):
    """The multiplexed RPC of `stage` (see `MuxServer`)."""
    server = MuxServer(stage, response_type, state)
    async for response in server.serve(requests, context, idle_timeout_s):
        yield response
