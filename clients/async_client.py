"""The asyncio SDK: `AsyncConverseClient` and the `AsyncConversation` it returns.

    async with AsyncConverseClient("localhost:50051") as client:
        async for event in client.converse_wav("question.wav", realtime=True):
            ...

Same behaviour as the blocking client (typed events, start-only retries with backoff and
jitter, TLS, bearer token, deadlines); audio sources may be sync or async iterables.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
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
from .source import AsyncReplaySource, Chunk, apaced, chunk_array, read_wav_chunks

log = logging.getLogger(__name__)


# SessionSummary.reason -> the status the gateway ends such a session with.
_REASON_CODES = {
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "backend_failed": grpc.StatusCode.UNAVAILABLE,
    "draining": grpc.StatusCode.UNAVAILABLE,
    "max_session_length": grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _recover_status(
    err: grpc.aio.AioRpcError, summary: SessionSummary | None
) -> tuple[grpc.StatusCode, str]:
    """The call's status, undoing grpc.aio's INTERNAL overwrite where the summary tells.

    grpc.aio reports INTERNAL "Internal error from Core" when a write races the server's
    final status (grpc/grpc#36066). If the gateway already sent its SessionEnded summary,
    the summary's reason says which status it really chose.
    """
    code, details = err.code(), err.details() or ""
    if (
        code == grpc.StatusCode.INTERNAL
        and "Internal error from Core" in details
        and summary is not None
        and summary.reason in _REASON_CODES
    ):
        return _REASON_CODES[summary.reason], (
            f"session ended: {summary.reason} (status reported as INTERNAL by grpc.aio, "
            "grpc/grpc#36066)"
        )
    return code, details


class AsyncConversation:
    """One Converse session: `async for` over it for its reply events, once."""

    def __init__(
        self,
        stub: gateway_pb2_grpc.GatewayStub,
        chunks: Iterable[Chunk] | AsyncIterable[Chunk],
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
        self._source = AsyncReplaySource(
            chunks,
            session.encoding,
            on_sent=self._tracker.on_sent,
            before_send=self._window.await_open if self._window else None,
        )
        self._call = None
        self._cancelled = False
        self._consumed = False
        self.started: SessionStarted | None = None
        self.summary: SessionSummary | None = None
        self.attempts = 0
        self.retry_delays: list[float] = []  # seconds waited before each retry

    def __aiter__(self) -> AsyncIterator[ReplyEvent]:
        if self._consumed:
            raise RuntimeError("an AsyncConversation can be iterated only once")
        self._consumed = True
        return self._events()

    def cancel(self) -> None:
        """End the session from the client side (the gateway frees its slots)."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    def latency(self) -> LatencyStats:
        return self._tracker.stats()

    async def collect(self, on_event: EventCallback | None = None) -> ConverseResult:
        """Run the whole session and gather its reply audio, transcript and events."""
        return await ConverseResult.agather(self, on_event=on_event)

    @property
    def session(self) -> SessionOptions:
        return self._session

    async def _events(self) -> AsyncIterator[ReplyEvent]:
        try:
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
                    async for resp in call:
                        if not got_reply:
                            got_reply = True
                            self._source.mark_started()
                        event = from_response(
                            resp, self._session.encoding, self._session.sample_rate
                        )
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
                except grpc.aio.AioRpcError as err:
                    if self._source.error is not None:
                        raise self._source.error from None
                    code, details = _recover_status(err, self.summary)
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
                            await asyncio.sleep(delay)
                            continue
                    raise ConverseError(
                        code,
                        details,
                        retry_after_ms=hint,
                        attempts=self.attempts,
                        started=got_reply,
                    ) from None
                finally:
                    # Leaving early must end the RPC so the gateway frees the session's slots.
                    call.cancel()
        finally:
            self._source.close()


class AsyncConverseClient:
    """asyncio client of the gateway's Converse API (options as `ConverseClient`).

    Create it inside a running event loop; close it with `await client.close()` or
    `async with`.
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
        self._channel = self._opts.aio_channel()
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    async def __aenter__(self) -> AsyncConverseClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the channel connects (raises asyncio.TimeoutError otherwise)."""
        await asyncio.wait_for(self._channel.channel_ready(), timeout)

    def converse(
        self,
        chunks: Iterable[Chunk] | AsyncIterable[Chunk],
        session: SessionOptions | None = None,
        *,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        window_frames: int | None = None,
        **session_fields,
    ) -> AsyncConversation:
        """Start a session over `chunks` (sync or async iterable; see `ConverseClient.converse`)."""
        if session is None:
            session = SessionOptions(**session_fields)
        elif session_fields:
            raise TypeError("pass either a SessionOptions or its fields, not both")
        return AsyncConversation(
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
    ) -> AsyncConversation:
        """Stream a whole mono signal, optionally paced at real time."""
        chunks = chunk_array(samples, sample_rate, chunk_ms)
        source = apaced(chunks, sample_rate) if realtime else chunks
        return self.converse(source, sample_rate=sample_rate, **kwargs)

    def converse_wav(
        self, path: str | Path, *, realtime: bool = False, chunk_ms: float = 80.0, **kwargs
    ) -> AsyncConversation:
        """Stream a mono wav file at its own sample rate, optionally paced at real time."""
        sample_rate, _, chunks = read_wav_chunks(path, chunk_ms)
        source = apaced(chunks, sample_rate) if realtime else chunks
        return self.converse(source, sample_rate=sample_rate, **kwargs)
