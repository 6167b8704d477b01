"""What the blocking and the asyncio SDK share, free of any transport: session settings,
reply-to-event conversion, the start-only retry decision and summary handling.

`ConversationCore` holds one session's state; `Conversation` (grpc) and `AsyncConversation`
(grpc.aio) only add their own retry source and the loop that reads the call, so both
retry, time out and report the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import grpc

from moshi_grpc.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

from .events import (
    OGG_OPUS,
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
    pacing_for,
    retry_after_ms,
)

log = logging.getLogger(__name__)


# SessionSummary.reason -> the status the gateway ends such a session with.
_REASON_CODES = {
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "backend_failed": grpc.StatusCode.UNAVAILABLE,
    "draining": grpc.StatusCode.UNAVAILABLE,
    "max_session_length": grpc.StatusCode.DEADLINE_EXCEEDED,
    "text_policy": grpc.StatusCode.PERMISSION_DENIED,
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


def whole_signal_fields(realtime: bool, fields: dict[str, Any]) -> dict[str, Any]:
    """Session fields for a whole file or array: its pacing (`pacing_for`) unless the caller
    chose one or passed a whole `SessionOptions`."""
    if "session" not in fields:
        fields.setdefault("input_pacing", pacing_for(realtime))
    return fields


def session_from(session: SessionOptions | None, fields: dict[str, Any]) -> SessionOptions:
    """A `SessionOptions` given as one, or as its fields by keyword (not both)."""
    if session is None:
        return SessionOptions(**fields)
    if fields:
        raise TypeError("pass either a SessionOptions or its fields, not both")
    return session


class ClientCore:
    """Channel settings, default retry policy and deadline of a client (sync or aio)."""

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
        self._channel = self._open_channel()
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def _open_channel(self) -> Any:
        raise NotImplementedError

    @staticmethod
    def _info_request() -> common_pb2.InfoRequest:
        return common_pb2.InfoRequest()

    def _info_call(self, timeout: float) -> dict[str, Any]:
        """Keyword arguments of a `Gateway.Info` call: the token, a deadline."""
        return {"metadata": self._opts.metadata(), "timeout": timeout}

    def _call_settings(
        self, timeout: float | None, retry: RetryPolicy | None, window_frames: int | None
    ) -> dict[str, Any]:
        """The keyword arguments of a conversation: per-call overrides of the defaults."""
        return {
            "metadata": self._opts.metadata(),
            "retry": retry or self._retry,
            "timeout": self._timeout if timeout is None else timeout,
            "window_frames": window_frames,
        }


class ConversationCore:
    """One session's state and decisions; subclasses make the retry source and read the
    call."""

    def __init__(
        self,
        stub: gateway_pb2_grpc.GatewayStub,
        chunks: Any,
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
        self._decoder: Any = None  # the reply's Ogg Opus stream decoder, one per attempt
        self._window = SendWindow(self._tracker, window_frames) if window_frames else None
        self._call: Any = None
        self._cancelled = False
        self._consumed = False
        self._got_reply = False
        self.started: SessionStarted | None = None
        self.summary: SessionSummary | None = None
        self.attempts = 0
        self.retry_delays: list[float] = []  # seconds waited before each retry
        self._source = self._make_source(chunks)

    def _make_source(self, chunks: Any) -> Any:
        """The transport's retry source (`RetrySource` / `AsyncRetrySource`)."""
        raise NotImplementedError

    def cancel(self) -> None:
        """End the session from the client side (the gateway frees its slots)."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    def latency(self) -> LatencyStats:
        return self._tracker.stats()

    @property
    def bytes_sent(self) -> int:
        """Audio bytes sent in this session's last attempt (wire encoding)."""
        return self._source.bytes_sent

    @property
    def session(self) -> SessionOptions:
        return self._session

    def _deadline(self) -> float | None:
        return None if self._timeout is None else time.monotonic() + self._timeout

    def _open_call(self, first: gateway_pb2.ConverseRequest, deadline: float | None) -> Any:
        """Start one attempt: fresh latency/window state, the remaining deadline."""
        if self._cancelled:  # cancelled while waiting to retry
            raise ConverseError(
                grpc.StatusCode.CANCELLED, "cancelled by the client", attempts=self.attempts
            )
        self.attempts += 1
        generation = self._source.new_attempt()
        self._tracker.reset()
        if self._session.encoding == OGG_OPUS:  # each attempt's reply is a new Ogg stream
            from moshi_grpc import audio

            self._decoder = audio.StreamDecoder(OGG_OPUS, self._session.sample_rate)
        if self._window is not None:
            self._window.reset()
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._got_reply = False
        self._call = self._stub.Converse(
            self._source.requests(first, generation),
            timeout=remaining,
            metadata=self._metadata,
        )
        return self._call

    def _on_reply(self, resp: gateway_pb2.ConverseResponse) -> ReplyEvent | None:
        """Convert one response; track latency, the send window, start and summary."""
        if not self._got_reply:
            self._got_reply = True
            self._source.mark_started()
        event = from_response(
            resp, self._session.encoding, self._session.sample_rate, self._decoder
        )
        if isinstance(event, AudioFrame):
            self._tracker.on_frame(event.frame_index)
            if self._window is not None:
                self._window.on_frame(event.frame_index)
        elif isinstance(event, SessionStarted):
            self.started = event
        elif isinstance(event, SessionEnded):
            self.summary = event.summary
        return event

    def _raise_source_error(self) -> None:
        """A failure reading the caller's audio wins over the call's own status."""
        if self._source.error is not None:
            raise self._source.error

    def _status(self, err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
        return err.code(), err.details() or ""

    def _retry_delay(self, err: grpc.RpcError, deadline: float | None) -> float:
        """Seconds to wait before retrying the session start after `err`.

        Only a start refused before any reply is retried (RESOURCE_EXHAUSTED/UNAVAILABLE,
        within the attempts and the deadline); otherwise this raises the final error."""
        if self._source.error is not None:
            raise self._source.error from None
        code, details = self._status(err)
        hint = retry_after_ms(err.trailing_metadata())
        if (
            not self._got_reply
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
                return delay
        raise ConverseError(
            code,
            details,
            retry_after_ms=hint,
            attempts=self.attempts,
            started=self._got_reply,
        ) from None
