"""A session's backend streams, per session or multiplexed (`--backend-streams`).

A session's link to a stage (links.py) uses one interface, `open(msg)` / `send(frame)` /
`read()` / `done_writing()` / `close()` / `done()` / `code()` / `details()` (`frame`: a
message or, cheaper, a dict of its fields, built in place inside the request), with a
grpc.aio stream-stream call's semantics (`read` returns `grpc.aio.EOF` at a clean end, raises
`AioRpcError` on failure), except `close()`: our side drops the stream (the backend frees
the slot), and `read()` returns `CLOSED` from then on, writes are dropped. Two kinds:

- `PerSessionStream`: one RPC per session and stage (`Encode`, `Step`, `Decode`): the
  original path, kept behind `--backend-streams per-session`.
- `MuxedCall` on a `MuxStream` (the default, `--backend-streams mux`): one
  `EncodeMux` / `StepMux` / `DecodeMux` stream per (gateway, replica, stage), opened lazily
  and shared by every session pinned to that replica. A sender task drains every pending
  entry into ONE request message each time it runs (whatever queued while the previous
  write was in flight), and a reader task routes the results to the sessions. Optionally
  (`--mux-coalesce-ms`, off by default: it costs latency) a busy stream's sender, once
  woken, first waits a short window so that more sessions' entries share the message; a
  stream too quiet to collect another entry in that time, and a lone session, do not wait
  (`coalesce_wait`). A session's own error ends only that session (its `end` result
  carries the status, raised from `read()` as an `AioRpcError`, exactly like a per-session
  stream ending with that status). A mux stream that fails is a failure of every session
  on it: each gets the stream's status (UNAVAILABLE when the replica died), so the session
  logic (UNAVAILABLE to the client, or LM failover by replay) is the same in both modes.

Why: each grpc.aio message operation is a large part of the gateway's CPU per frame
(cython, the completion-queue poller thread, an event-loop wake-up). Per session a frame
takes 6 of them to the backends (a write and a read on each of three streams); multiplexed,
a frame's entries share messages with other sessions' (fewer message operations per frame
as the load grows, fewer again with a coalescing window); the 2 operations on the client's
own Converse stream remain. Figures: README, "Gateway" benchmark.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import grpc

from moshi_grpc import audio
from moshi_grpc.services.common.errors import (
    BackendUnavailable,
    CapacityExhausted,
    InvalidInput,
    NotFound,
    ServiceError,
    WrongModel,
)
from moshi_grpc.services.common.status import status_code

log = logging.getLogger(__name__)

MUX = "mux"
PER_SESSION = "per-session"
MODES = (MUX, PER_SESSION)

_EOF = grpc.aio.EOF


class _Closed:
    """What `read()` returns on a stream our side closed (`close()`)."""

    def __repr__(self) -> str:
        return "CLOSED"


CLOSED = _Closed()

# Entries per mux message at most (backends answer with the same cap): 256 PCM frames are
# ~2 MB, well under the 4 MiB message limit of the channels, however far a slow replica
# lets the queue grow.
MAX_ENTRIES_PER_MESSAGE = 256

# One frame's duration: each session sends one entry per stage per frame.
FRAME_S = audio.FRAME_SIZE / audio.MODEL_RATE


def coalesce_wait(sessions: int, coalesce_s: float) -> float:
    """How long a mux stream's sender waits, once woken by a first entry, before sealing
    the message: `coalesce_s` when the stream is busy enough that at least one more
    entry is expected in that time (each session sends one entry per 80 ms frame:
    `sessions * coalesce_s >= FRAME_S`), else 0 (one loop pass). Every message costs
    the gateway (and the backend) CPU whatever its size, so under load fewer, larger
    messages are cheaper; a frame waits at most `coalesce_s` per stage for it, and a
    lightly loaded stream, where waiting would collect nothing, never waits."""
    if coalesce_s > 0 and sessions * coalesce_s >= FRAME_S:
        return coalesce_s
    return 0.0


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An AioRpcError as a failed grpc.aio call raises it."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class RetryableCapacity(CapacityExhausted):
    """A backend refused the stream for lack of slots; the client may retry after a while."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


def backend_error(
    replica: Any, stage: str, exc: grpc.aio.AioRpcError, retry_ms: int
) -> RetryableCapacity | BackendUnavailable:
    """Map a backend stream's failure to the status the client gets."""
    code = exc.code()
    what = f"{replica.kind} replica {replica.address} ({stage})"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return RetryableCapacity(f"{what} has no free slot: {exc.details()}", retry_ms)
    return BackendUnavailable(f"{what} failed: {code.name}: {exc.details()}")


# A backend's refusal of an open, when what the open carries came from the client (a
# persona prompt): the client's own error, passed on with the backend's reason.
_CLIENT_FAULTS: dict[grpc.StatusCode, type[ServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.FAILED_PRECONDITION: WrongModel,
    grpc.StatusCode.NOT_FOUND: NotFound,
}


def open_refusal(
    replica: Any, stage: str, exc: grpc.aio.AioRpcError, retry_ms: int
) -> ServiceError:
    """Map a backend's refusal of a session's open to the status the client gets: its
    INVALID_ARGUMENT, FAILED_PRECONDITION and NOT_FOUND pass through (what was refused is
    the client's input), anything else as `backend_error`."""
    fault = _CLIENT_FAULTS.get(exc.code())
    if fault is None:
        return backend_error(replica, stage, exc, retry_ms)
    return fault(f"{replica.kind} replica {replica.address} refused the session: {exc.details()}")


async def guarded_write(
    replica: Any, stage: str, call: Any, message: Any, retry_ms: int, is_open: bool = False
) -> None:
    """Send a frame (or the `open`) on a backend stream; its failure -> the session's."""
    try:
        if is_open:
            await call.open(message)
        else:
            await call.send(message)
    except grpc.aio.AioRpcError as exc:
        raise backend_error(replica, stage, exc, retry_ms) from None
    except asyncio.InvalidStateError:
        # The call already ended: its status says why.
        code = await call.code()
        details = await call.details()
        raise backend_error(replica, stage, rpc_error(code, details), retry_ms) from None


def _cancelling() -> bool:
    """Whether the running task itself is being cancelled (not just a call under it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class PerSessionStream:
    """One RPC per session and stage: a thin wrapper over the grpc.aio call.

    grpc.aio raises CancelledError from a read or write that a `cancel()` of the call
    interrupts; after our own `close()` those read as CLOSED and are dropped instead, so a
    closed stream behaves like a closed `MuxedCall`. A cancellation of the task goes on."""

    def __init__(self, call: Any, request_type: type) -> None:
        self.call = call
        self._request = request_type
        self._closed = False
        self.done = call.done
        self.code = call.code
        self.details = call.details

    async def read(self) -> Any:
        if self._closed:
            return CLOSED
        try:
            return await self.call.read()
        except asyncio.CancelledError:
            if self._closed and not _cancelling():
                return CLOSED
            raise

    async def _write(self, write: Any, *message: Any) -> None:
        if self._closed:
            return
        try:
            await write(*message)
        except asyncio.CancelledError:
            if not self._closed or _cancelling():
                raise

    async def open(self, message: Any) -> None:
        await self._write(self.call.write, self._request(open=message))

    async def send(self, frame: Any) -> None:
        await self._write(self.call.write, self._request(frame=frame))

    async def done_writing(self) -> None:
        await self._write(self.call.done_writing)

    def close(self) -> None:
        """Cancel the call (the backend frees the slot); reads return CLOSED from now on."""
        if not self._closed:
            self._closed = True
            self.call.cancel()


class MuxedCall:
    """One session's call on a shared `MuxStream`: the interface of `PerSessionStream`, so
    the session cannot tell the two apart (the backend's side is `mux._ServedSession`)."""

    __slots__ = ("_mux", "sid", "_results", "_waiter", "_end", "_closed", "_half_closed")

    def __init__(self, mux: MuxStream, sid: int) -> None:
        self._mux = mux
        self.sid = sid
        self._results: deque[Any] = deque()
        self._waiter: asyncio.Future | None = None
        self._end: Any = None  # None while open, then _EOF or the AioRpcError that ended it
        self._closed = False  # our side closed it: `close()`
        self._half_closed = False  # our side sent `close` (done writing)

    # -- writing (never blocks: the entry joins the stream's next message) ------------------

    def _writable(self) -> bool:
        if isinstance(self._end, grpc.aio.AioRpcError) and not self._closed:
            raise self._end
        return self._end is None and not self._closed

    async def open(self, message: Any) -> None:
        if self._writable():
            self._mux.put(self.sid, "open", message)

    async def send(self, frame: Any) -> None:
        if self._writable():
            self._mux.put(self.sid, "frame", frame)

    async def done_writing(self) -> None:
        if self._writable() and not self._half_closed:
            self._half_closed = True
            self._mux.put(self.sid, "close", True)

    # -- reading ------------------------------------------------------------------------

    async def read(self) -> Any:
        while True:
            if self._closed:
                return CLOSED  # answers still queued are dropped with the session
            if self._results:
                return self._results.popleft()
            end = self._end
            if end is not None:
                if end is _EOF:
                    return _EOF
                raise end
            waiter = self._mux.loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _deliver(self, message: Any) -> None:
        self._results.append(message)
        self._wake()

    def _finish(self, end: Any) -> None:
        if self._end is None:
            self._end = end
        self._wake()

    # -- state --------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the session now: the backend frees its slot; reads return CLOSED."""
        if self._closed:
            return
        self._closed = True
        if self._end is None:
            self._mux.forget(self.sid, cancel=True)
        self._wake()

    def done(self) -> bool:
        return self._closed or self._end is not None

    async def code(self) -> grpc.StatusCode:
        if isinstance(self._end, grpc.aio.AioRpcError):
            return self._end.code()
        return grpc.StatusCode.CANCELLED if self._closed else grpc.StatusCode.OK

    async def details(self) -> str:
        if isinstance(self._end, grpc.aio.AioRpcError):
            return self._end.details() or ""
        return ""


class MuxStream:
    """One multiplexed stream to one replica for one stage, shared by many sessions."""

    def __init__(
        self, replica: Any, stage: Any, metadata: tuple = (), coalesce_s: float = 0.0
    ) -> None:
        self.replica = replica
        self.name = stage.name
        self.coalesce_s = coalesce_s  # see `coalesce_wait`
        self.loop = asyncio.get_running_loop()
        self.sessions: dict[int, MuxedCall] = {}
        self.error: grpc.aio.AioRpcError | None = None
        self._next_sid = 1
        self._request_type = stage.rpcs.mux_request
        self._request = self._request_type()
        self._entries = self._request.entries
        self._full: deque[Any] = deque()  # requests that reached the cap, oldest first
        self._wake = asyncio.Event()
        self._call = getattr(replica.stub, stage.rpcs.mux)(metadata=metadata)
        self._sender = self.loop.create_task(
            self._send_loop(), name=f"mux-send:{self.name}:{replica.address}"
        )
        self._reader = self.loop.create_task(
            self._read_loop(), name=f"mux-read:{self.name}:{replica.address}"
        )

    @property
    def broken(self) -> bool:
        return self.error is not None

    def session(self) -> MuxedCall:
        """A new session on this stream (its `open` is sent by the caller)."""
        sid = self._next_sid
        self._next_sid += 1
        session = MuxedCall(self, sid)
        if self.error is not None:
            session._finish(self.error)
        else:
            self.sessions[sid] = session
        return session

    def put(self, sid: int, kind: str, value: Any) -> None:
        """Queue one entry for the next request message."""
        self._entries.add(session=sid, **{kind: value})
        if len(self._entries) >= MAX_ENTRIES_PER_MESSAGE:
            self._seal()
        self._wake.set()

    def _seal(self) -> None:
        """The current request is complete: queue it for sending, start a new one."""
        self._full.append(self._request)
        self._request = self._request_type()
        self._entries = self._request.entries

    def forget(self, sid: int, *, cancel: bool) -> None:
        if self.sessions.pop(sid, None) is not None and cancel and self.error is None:
            self.put(sid, "cancel", True)

    async def _send_loop(self) -> None:
        wake = self._wake
        call = self._call
        coalesce_s = self.coalesce_s
        try:
            while True:
                await wake.wait()
                if len(self.sessions) > 1:
                    # At least one loop pass: entries from the completions that are ready
                    # now join this message too; on a busy stream, the coalescing window
                    # (see `coalesce_wait`). A lone session has nobody to wait for.
                    await asyncio.sleep(coalesce_wait(len(self.sessions), coalesce_s))
                wake.clear()
                if len(self._entries):
                    self._seal()
                full = self._full
                while full:
                    await call.write(full.popleft())
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            self._failed(exc)
        except Exception as exc:  # noqa: BLE001 - e.g. InvalidStateError: the call ended
            code = await call.code() if call.done() else None
            details = await call.details() if call.done() else str(exc)
            self._failed(rpc_error(code or grpc.StatusCode.UNAVAILABLE, details or repr(exc)))

    async def _read_loop(self) -> None:
        call = self._call
        sessions = self.sessions
        try:
            while True:
                response = await call.read()
                if response is _EOF:
                    code = await call.code()
                    details = await call.details()
                    if code == grpc.StatusCode.OK:
                        code = grpc.StatusCode.UNAVAILABLE
                        details = "the replica ended the multiplexed stream (draining?)"
                    self._failed(rpc_error(code, details))
                    return
                for result in response.results:
                    session = sessions.get(result.session)
                    if session is None:  # cancelled by us meanwhile
                        continue
                    if result.HasField("frame"):
                        session._deliver(result.frame)
                        continue
                    end = result.end
                    del sessions[result.session]
                    if end.code == 0:
                        session._finish(_EOF)
                    else:
                        code = status_code(end.code)
                        session._finish(rpc_error(code, end.message))
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            self._failed(exc)
        except Exception as exc:  # noqa: BLE001
            log.exception("%s mux stream to %s: bad response", self.name, self.replica.address)
            self._failed(rpc_error(grpc.StatusCode.INTERNAL, f"bad mux response: {exc!r}"))

    def _failed(self, error: grpc.aio.AioRpcError) -> None:
        """The stream is gone: every session on it fails with its status."""
        if self.error is not None:
            return
        self.error = error
        if self.sessions:
            log.warning(
                "%s mux stream to %s failed (%s: %s): %d session(s) on it",
                self.name,
                self.replica.address,
                error.code().name,
                error.details(),
                len(self.sessions),
            )
        sessions = list(self.sessions.values())
        self.sessions.clear()
        for session in sessions:
            session._finish(error)
        self.close()

    def close(self) -> None:
        """Cancel the stream and its tasks (the backend frees the slots of its sessions)."""
        if self.error is None:
            self.error = rpc_error(grpc.StatusCode.UNAVAILABLE, "multiplexed stream closed")
            for session in list(self.sessions.values()):
                session._finish(self.error)
            self.sessions.clear()
        if not self._call.done():
            self._call.cancel()
        current = asyncio.current_task()
        for task in (self._sender, self._reader):
            if task is not current and not task.done():
                task.cancel()


def open_stream(
    replica: Any, stage: Any, metadata: tuple, mode: str, coalesce_s: float = 0.0
) -> Any:
    """A session's stream for `stage` (a `pipeline.Stage`: its name and RPCs) on `replica`:
    per session, or on the replica's shared
    mux stream for that stage (opened now if there is none or the last one failed, with the
    coalescing window `coalesce_s`, see `coalesce_wait`)."""
    if mode == PER_SESSION:
        call = getattr(replica.stub, stage.rpcs.per_session)(metadata=metadata)
        return PerSessionStream(call, stage.rpcs.request)
    mux = replica.mux.get(stage.name)
    if mux is None or mux.broken:
        mux = MuxStream(replica, stage, metadata, coalesce_s)
        replica.mux[stage.name] = mux
    return mux.session()
