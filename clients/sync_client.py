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

import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc
import numpy as np

from .core import ClientCore, ConversationCore, session_from, whole_signal_fields
from .events import ReplyEvent
from .info import GatewayInfo, VoiceInfo
from .options import ConverseError, RetryPolicy, SessionOptions
from .result import ConverseResult, EventCallback
from .source import Chunk, RetrySource, chunk_array, paced, read_wav_chunks


class Conversation(ConversationCore):
    """One Converse session: iterate over it for its reply events, once.

    After iteration: `started` (the SessionStarted event), `summary` (the server's totals, when
    the gateway sent SessionEnded), `latency()` (client-observed per-frame latency) and
    `attempts` (session starts tried).
    """

    def _make_source(self, chunks: Iterable[Chunk]) -> RetrySource:
        return RetrySource(
            chunks,
            self._session.encoding,
            on_sent=self._tracker.on_sent,
            before_send=self._window.wait if self._window else None,
            sample_rate=self._session.sample_rate,
            start_gate=self._session.persona is not None,
        )

    def __iter__(self) -> Iterator[ReplyEvent]:
        if self._consumed:
            raise RuntimeError("a Conversation can be iterated only once")
        self._consumed = True
        return self._events()

    def collect(self, on_event: EventCallback | None = None) -> ConverseResult:
        """Run the whole session and gather its reply audio, transcript and events."""
        return ConverseResult.gather(self, on_event=on_event)

    def _events(self) -> Iterator[ReplyEvent]:
        try:
            deadline = self._deadline()
            first = self._session.to_proto()
            while True:
                call = self._open_call(first, deadline)
                try:
                    for resp in call:
                        event = self._on_reply(resp)
                        if event is not None:
                            yield event
                    self._raise_source_error()
                    return
                except grpc.RpcError as err:
                    time.sleep(self._retry_delay(err, deadline))
                    continue
                finally:
                    # Leaving early (break, exception in the caller's loop) must end the RPC
                    # so the gateway frees the session's slots at once.
                    call.cancel()
        finally:
            self._source.close()  # a request stream waiting at the start gate ends


class ConverseClient(ClientCore):
    """Blocking client of the gateway's Converse API.

    `addr` is host:port (any gRPC target, e.g. `dns:///gateway:50051`). `tls` enables TLS
    (`TlsOptions(root_ca=..., client_cert=..., client_key=...)` for mTLS); `token` is sent as
    `authorization: Bearer <token>`; `retry` governs session-start retries; `timeout` is the
    default deadline of a whole session in seconds (None = none).
    """

    def _open_channel(self) -> grpc.Channel:
        return self._opts.sync_channel()

    def __enter__(self) -> ConverseClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects (raises grpc.FutureTimeoutError otherwise)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def info(self, timeout: float = 10.0) -> GatewayInfo:
        """What the gateway offers: its named voices, whether it serves personas, its
        version (`ConverseError` with the status when the call fails)."""
        try:
            reply = self._stub.Info(self._info_request(), **self._info_call(timeout))
        except grpc.RpcError as err:
            raise ConverseError(err.code(), err.details() or "") from None
        return GatewayInfo.from_proto(reply)

    def voices(self, timeout: float = 10.0) -> tuple[VoiceInfo, ...]:
        """The gateway's named voices (`Persona.named(voice_id, prompt)`)."""
        return self.info(timeout).voices

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
        return Conversation(
            self._stub,
            chunks,
            session_from(session, session_fields),
            **self._call_settings(timeout, retry, window_frames),
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
        return self.converse(
            chunks, sample_rate=sample_rate, **whole_signal_fields(realtime, kwargs)
        )

    def converse_wav(
        self, path: str | Path, *, realtime: bool = False, chunk_ms: float = 80.0, **kwargs
    ) -> Conversation:
        """Stream a mono wav file at its own sample rate, optionally paced at real time."""
        sample_rate, _, chunks = read_wav_chunks(path, chunk_ms)
        if realtime:
            chunks = paced(chunks, sample_rate)
        return self.converse(
            chunks, sample_rate=sample_rate, **whole_signal_fields(realtime, kwargs)
        )
