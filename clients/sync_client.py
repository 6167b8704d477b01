"""The blocking SDK: `ConverseClient` and the `Conversation` it returns.

    with ConverseClient("localhost:50051") as client:
        for event in client.converse_wav("question.wav"):
            ...

A conversation is an iterator of typed events (see `events`). Its session start is retried on
RESOURCE_EXHAUSTED/UNAVAILABLE with exponential backoff and jitter (honouring the gateway's
`retry-after-ms` hint); once any reply arrived nothing is retried and a failure raises
`ConverseError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc
import numpy as np

from moshi_grpc.v1 import gateway_pb2_grpc

from .events import (
    AudioFrame,
    ReplyEvent,
    SessionEnded,
    SessionStarted,
    SessionSummary,
    from_response,
)
from .latency import LatencyStats, LatencyTracker, SendWindow
from .options import (
    RETRYABLE_CODES,
    ChannelOptions,
    ConverseError,
    RetryPolicy,
    SessionOptions,
    TlsOptions,
    retry_after_ms,
)
from .result import ConverseResult, EventCallback
from .source import Chunk, ReplaySource, chunk_array, paced, read_wav_chunks

log = logging.getLogger(__name__)


class Conversation:
    """One Converse session: iterate over it for its reply events, once.

    After iteration: `started` (the SessionStarted event), `summary` (the server's totals, when
    the gateway sent SessionEnded), `latency()` (client-observed per-frame latency) and
    `attempts` (session starts tried).
    """

    def __init__(
        self,
        stub: gateway_pb2_grpc.GatewayStub,
        chunks: Iterable[Chunk],
        session: SessionOptions,
        *,
        metadata: tuple[tuple[str, str], ...],
        retry: RetryPolicy,
        timeout: float | None,
        window_frames: int | None = None,
    ) -> None:
        self._stub = stub
        self._session = session
        self._metadata = metadata
        self._retry = retry
        self._timeout = timeout
        self._tracker = LatencyTracker(session.sample_rate)
        self._window = SendWindow(self._tracker, window_frames) if window_frames else None
        self._source = ReplaySource(
            chunks,
            session.encoding,
            on_sent=self._tracker.on_sent,
            before_send=self._window.wait if self._window else None,
        )
        self._call: grpc.Call | None = None
        self._cancelled = False
        self._consumed = False
        self.started: SessionStarted | None = None
        self.summary: SessionSummary | None = None
        self.attempts = 0
        self.retry_delays: list[float] = []  # seconds waited before each retry

    def __iter__(self) -> Iterator[ReplyEvent]:
        if self._consumed:
            raise RuntimeError("a Conversation can be iterated only once")
        self._consumed = True
        return self._events()

    def cancel(self) -> None:
        """End the session from the client side (the gateway frees its slots)."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    def latency(self) -> LatencyStats:
        return self._tracker.stats()

    def collect(self, on_event: EventCallback | None = None) -> ConverseResult:
        """Run the whole session and gather its reply audio, transcript and events."""
        return ConverseResult.gather(self, on_event=on_event)

    @property
    def session(self) -> SessionOptions:
        return self._session

    def _events(self) -> Iterator[ReplyEvent]:
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        first = self._session.to_proto()
        while True:
            if self._cancelled:  # cancelled while waiting to retry
                raise ConverseError(
                    grpc.StatusCode.CANCELLED, "cancelled by the client", attempts=self.attempts
                )
            self.attempts += 1
            generation = self._source.new_attempt()
            self._tracker.reset()
            if self._window is not None:
                self._window.reset()
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            call = self._stub.Converse(
                self._source.requests(first, generation),
                timeout=remaining,
                metadata=self._metadata,
            )
            self._call = call
            got_reply = False
            try:
                for resp in call:
                    if not got_reply:
                        got_reply = True
                        self._source.mark_started()
                    event = from_response(resp, self._session.encoding, self._session.sample_rate)
                    if isinstance(event, AudioFrame):
                        self._tracker.on_frame(event.frame_index)
                        if self._window is not None:
                            self._window.on_frame(event.frame_index)
                    elif isinstance(event, SessionStarted):
                        self.started = event
                    elif isinstance(event, SessionEnded):
                        self.summary = event.summary
                    if event is not None:
                        yield event
                if self._source.error is not None:
                    raise self._source.error
                return
            except grpc.RpcError as err:
                if self._source.error is not None:
                    raise self._source.error from None
                code = err.code()
                details = err.details() or ""
                hint = retry_after_ms(err.trailing_metadata())
                if (
                    not got_reply
                    and not self._cancelled
                    and code in RETRYABLE_CODES
                    and self.attempts < self._retry.max_attempts
                ):
                    delay = self._retry.delay_s(self.attempts, hint)
                    if deadline is None or time.monotonic() + delay < deadline:
                        self.retry_delays.append(delay)
                        log.info(
                            "session start refused (%s: %s); retry %d in %.2fs",
                            code.name,
                            details,
                            self.attempts + 1,
                            delay,
                        )
                        time.sleep(delay)
                        continue
                raise ConverseError(
                    code,
                    details,
                    retry_after_ms=hint,
                    attempts=self.attempts,
                    started=got_reply,
                ) from None
            finally:
                # Leaving early (break, exception in the caller's loop) must end the RPC so
                # the gateway frees the session's slots at once.
                call.cancel()


class ConverseClient:
    """Blocking client of the gateway's Converse API.

    `addr` is host:port (any gRPC target, e.g. `dns:///gateway:50051`). `tls` enables TLS
    (`TlsOptions(root_ca=..., client_cert=..., client_key=...)` for mTLS); `token` is sent as
    `authorization: Bearer <token>`; `retry` governs session-start retries; `timeout` is the
    default deadline of a whole session in seconds (None = none).
    """

    def __init__(
        self,
        addr: str,
        *,
        tls: TlsOptions | None = None,
        token: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        channel_options: Iterable[tuple[str, object]] = (),
    ) -> None:
        self._opts = ChannelOptions(addr, tls=tls, token=token, extra=tuple(channel_options))
        self._retry = retry or RetryPolicy()
        self._timeout = timeout
        self._channel = self._opts.sync_channel()
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def __enter__(self) -> ConverseClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects (raises grpc.FutureTimeoutError otherwise)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def converse(
        self,
        chunks: Iterable[Chunk],
        session: SessionOptions | None = None,
        *,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        window_frames: int | None = None,
        **session_fields,
    ) -> Conversation:
        """Start a session over `chunks` (bytes in the session encoding, or numpy arrays).

        Session settings come as a `SessionOptions` or as its fields by keyword
        (`sample_rate=16000, seed=1, budget_ms=200, ...`). Nothing is sent until iteration.
        """
        if session is None:
            session = SessionOptions(**session_fields)
        elif session_fields:
            raise TypeError("pass either a SessionOptions or its fields, not both")
        return Conversation(
            self._stub,
            chunks,
            session,
            metadata=self._opts.metadata(),
            retry=retry or self._retry,
            timeout=self._timeout if timeout is None else timeout,
            window_frames=window_frames,
        )

    def converse_array(
        self,
        samples: np.ndarray,
        sample_rate: int,
        *,
        realtime: bool = False,
        chunk_ms: float = 80.0,
        **kwargs,
    ) -> Conversation:
        """Stream a whole mono signal (float in [-1, 1] or int16), optionally at real time."""
        chunks: Iterable[Chunk] = chunk_array(samples, sample_rate, chunk_ms)
        if realtime:
            chunks = paced(chunks, sample_rate)
        return self.converse(chunks, sample_rate=sample_rate, **kwargs)

    def converse_wav(
        self, path: str | Path, *, realtime: bool = False, chunk_ms: float = 80.0, **kwargs
    ) -> Conversation:
        """Stream a mono wav file at its own sample rate, optionally paced at real time."""
        sample_rate, _, chunks = read_wav_chunks(path, chunk_ms)
        if realtime:
            chunks = paced(chunks, sample_rate)
        return self.converse(chunks, sample_rate=sample_rate, **kwargs)
