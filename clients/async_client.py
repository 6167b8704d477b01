"""The asyncio SDK: `AsyncConverseClient` and the `AsyncConversation` it returns.

    async with AsyncConverseClient("localhost:50051") as client:
        async for event in client.converse_wav("question.wav", realtime=True):
            ...

Same behaviour as the blocking client (typed events, start-only retries with backoff and
jitter, TLS, bearer token, deadlines); audio sources may be sync or async iterables.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path

import grpc
import numpy as np

from .core import (
    ClientCore,
    ConversationCore,
    _recover_status,
    session_from,
    whole_signal_fields,
)
from .events import ReplyEvent
from .info import GatewayInfo, VoiceInfo
from .options import ConverseError, RetryPolicy, SessionOptions
from .result import ConverseResult, EventCallback
from .source import AsyncRetrySource, Chunk, apaced, chunk_array, read_wav_chunks


class AsyncConversation(ConversationCore):
    """One Converse session: `async for` over it for its reply events, once."""

    def _make_source(self, chunks: Iterable[Chunk] | AsyncIterable[Chunk]) -> AsyncRetrySource:
        return AsyncRetrySource(
            chunks,
            self._session.encoding,
            on_sent=self._tracker.on_sent,
            before_send=self._window.await_open if self._window else None,
            sample_rate=self._session.sample_rate,
            # A persona session: no audio before SessionStarted, however long the prompt takes.
            start_gate_s=None if self._session.persona is not None else 2.0,
        )

    def __aiter__(self) -> AsyncIterator[ReplyEvent]:
        if self._consumed:
            raise RuntimeError("an AsyncConversation can be iterated only once")
        self._consumed = True
        return self._events()

    async def collect(self, on_event: EventCallback | None = None) -> ConverseResult:
        """Run the whole session and gather its reply audio, transcript and events."""
        return await ConverseResult.agather(self, on_event=on_event)

    def _status(self, err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
        return _recover_status(err, self.summary)

    async def _events(self) -> AsyncIterator[ReplyEvent]:
        try:
            deadline = self._deadline()
            first = self._session.to_proto()
            while True:
                call = self._open_call(first, deadline)
                try:
                    async for resp in call:
                        event = self._on_reply(resp)
                        if event is not None:
                            yield event
                    self._raise_source_error()
                    return
                except grpc.aio.AioRpcError as err:
                    await asyncio.sleep(self._retry_delay(err, deadline))
                    continue
                finally:
                    # Leaving early must end the RPC so the gateway frees the session's slots.
                    call.cancel()
        finally:
            self._source.close()


class AsyncConverseClient(ClientCore):
    """asyncio client of the gateway's Converse API (options as `ConverseClient`).

    Create it inside a running event loop; close it with `await client.close()` or
    `async with`.
    """

    def _open_channel(self) -> grpc.aio.Channel:
        return self._opts.aio_channel()

    async def __aenter__(self) -> AsyncConverseClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the channel connects (raises asyncio.TimeoutError otherwise)."""
        await asyncio.wait_for(self._channel.channel_ready(), timeout)

    async def info(self, timeout: float = 10.0) -> GatewayInfo:
        """What the gateway offers (see `ConverseClient.info`)."""
        try:
            reply = await self._stub.Info(self._info_request(), **self._info_call(timeout))
        except grpc.aio.AioRpcError as err:
            raise ConverseError(err.code(), err.details() or "") from None
        return GatewayInfo.from_proto(reply)

    async def voices(self, timeout: float = 10.0) -> tuple[VoiceInfo, ...]:
        """The gateway's named voices."""
        return (await self.info(timeout)).voices

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
        return AsyncConversation(
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
    ) -> AsyncConversation:
        """Stream a whole mono signal, optionally paced at real time."""
        chunks = chunk_array(samples, sample_rate, chunk_ms)
        source = apaced(chunks, sample_rate) if realtime else chunks
        fields = whole_signal_fields(realtime, kwargs)
        return self.converse(source, sample_rate=sample_rate, **fields)

    def converse_wav(
        self, path: str | Path, *, realtime: bool = False, chunk_ms: float = 80.0, **kwargs
    ) -> AsyncConversation:
        """Stream a mono wav file at its own sample rate, optionally paced at real time."""
        sample_rate, _, chunks = read_wav_chunks(path, chunk_ms)
        source = apaced(chunks, sample_rate) if realtime else chunks
        fields = whole_signal_fields(realtime, kwargs)
        return self.converse(source, sample_rate=sample_rate, **fields)
