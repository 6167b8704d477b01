"""Audio sources for a session: chunking, real-time pacing, and the audio a retried start
sends again.

A session start may be refused (RESOURCE_EXHAUSTED/UNAVAILABLE) after some audio was already
pulled from the caller's iterator. `RetrySource` / `AsyncRetrySource` remember every chunk
pulled before the session started so that the next attempt sends exactly the same audio; once
started they forget what was sent.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Union

import numpy as np

from moshi_grpc.v1 import gateway_pb2

from .events import OGG_OPUS, PCM16
from .options import ClientConfigError

Chunk = Union[bytes, bytearray, memoryview, np.ndarray]


class ChunkEncoder:
    """A session's chunks -> wire bytes, with the number of samples they carry.

    Stateless for the fixed-size encodings (`encode_chunk`). For Ogg Opus one encoder makes
    one Ogg stream: arrays are coded in 80 ms packets (a call may return b"" while a packet
    fills; `finish()` pads and codes the rest), and `bytes` are passed through as a piece of
    an Ogg Opus stream, their samples counted by decoding them.
    """

    def __init__(self, encoding: str, sample_rate: int) -> None:
        self.encoding = encoding
        self.sample_rate = sample_rate
        self._opus = None
        self._counter = None
        self._pending = 0  # samples given to the Opus encoder and not yet reported
        self._finished = False
        self._kind: str | None = None  # "bytes" or "arrays": one Ogg stream cannot mix them
        if encoding == OGG_OPUS:
            from moshi_grpc import audio

            self._opus = audio.StreamEncoder(OGG_OPUS, sample_rate)
            self._counter = audio.StreamDecoder(OGG_OPUS, sample_rate)

    def encode(self, chunk: Chunk) -> tuple[bytes, int]:
        if self._opus is None:
            return encode_chunk(chunk, self.encoding)
        kind = "bytes" if isinstance(chunk, (bytes, bytearray, memoryview)) else "arrays"
        if self._kind not in (None, kind):
            raise ClientConfigError(
                "an Ogg Opus session takes either bytes (one Ogg Opus stream) or numpy "
                "arrays (coded by the SDK), not both"
            )
        self._kind = kind
        if kind == "bytes":
            data = bytes(chunk)
            return data, self._count(data)
        samples = _as_float(chunk)
        data = self._opus.encode(samples)
        self._pending += len(samples)
        if not data:
            return b"", 0
        n, self._pending = self._pending, 0
        return data, n

    def _count(self, data: bytes) -> int:
        """Samples in a piece of the caller's Ogg Opus stream (0 once it stops decoding: the
        gateway then answers INVALID_ARGUMENT, which is the error the caller should see)."""
        from moshi_grpc import audio

        if self._counter is None or not data:
            return 0
        try:
            return len(self._counter.decode(data))
        except audio.AudioFormatError:
            self._counter = None
            return 0

    def finish(self) -> tuple[bytes, int] | None:
        """Once, after the caller's last chunk: the Opus encoder's last packet, if any."""
        if self._opus is None or self._finished:
            return None
        self._finished = True
        data = self._opus.flush()
        n, self._pending = self._pending, 0
        return (data, n) if data else None


def _mono_array(chunk: Chunk) -> np.ndarray:
    """A caller's numpy chunk checked once for every path: mono `(n,)` (or `(n, 1)`),
    int16 or finite float."""
    if not isinstance(chunk, np.ndarray):
        raise ClientConfigError(f"audio chunks must be bytes or numpy arrays, got {type(chunk)}")
    a = chunk
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ClientConfigError(f"audio chunks must be mono (n,) arrays, got shape {chunk.shape}")
    if a.dtype == np.int16:
        return a
    if not np.issubdtype(a.dtype, np.floating):
        raise ClientConfigError(f"audio arrays must be float or int16, got {a.dtype}")
    if not np.isfinite(a).all():
        raise ClientConfigError("audio chunk contains NaN or Inf samples")
    return a


def _as_float(chunk: Chunk) -> np.ndarray:
    """A caller's numpy chunk -> mono float32 in [-1, 1] (int16 scaled)."""
    from moshi_grpc import audio

    a = _mono_array(chunk)
    if a.dtype == np.int16:
        return audio.decode_samples(a.astype("<i2").tobytes(), PCM16, allow_empty=True)
    return a.astype(np.float32, copy=False)


def encode_chunk(chunk: Chunk, encoding: str) -> tuple[bytes, int]:
    """A caller's chunk -> (wire bytes in the session encoding, number of samples).

    `bytes` are taken as already encoded; numpy arrays may be float (in [-1, 1]) or int16,
    shape (n,) or (n, 1) (mono). Fixed-size encodings only (Ogg Opus: `ChunkEncoder`).
    """
    from moshi_grpc import audio

    width = audio.bytes_per_sample(encoding)
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        data = bytes(chunk)
        if len(data) % width:
            raise ClientConfigError(
                f"a {encoding} chunk must hold whole {width}-byte samples, got {len(data)} bytes"
            )
        return data, len(data) // width
    a = _mono_array(chunk)
    if a.dtype == np.int16 and encoding == PCM16:  # already the wire format: no float round trip
        return a.astype("<i2").tobytes(), len(a)
    return audio.encode_samples(_as_float(a), encoding), len(a)


def chunk_array(
    samples: np.ndarray, sample_rate: int, chunk_ms: float = 80.0
) -> Iterator[np.ndarray]:
    """Split a mono signal into chunks of `chunk_ms` (the last one may be shorter)."""
    if chunk_ms <= 0:
        raise ClientConfigError(f"chunk_ms must be > 0, got {chunk_ms}")
    step = max(1, round(sample_rate * chunk_ms / 1000.0))
    for start in range(0, len(samples), step):
        yield samples[start : start + step]


def read_wav_chunks(
    path: str | Path, chunk_ms: float = 80.0
) -> tuple[int, np.ndarray, Iterator[np.ndarray]]:
    """Read a mono wav file: (sample_rate, all samples as float32, an iterator of chunks)."""
    from moshi_grpc import audio

    samples, sample_rate = audio.read_wav(path)
    return sample_rate, samples, chunk_array(samples, sample_rate, chunk_ms)


class _Durations:
    """Seconds of audio in each chunk; Ogg Opus bytes are measured by decoding them."""

    def __init__(self, sample_rate: int, encoding: str) -> None:
        self.sample_rate = sample_rate
        self.encoding = encoding
        self._counter: ChunkEncoder | None = None

    def __call__(self, chunk: Chunk) -> float:
        from moshi_grpc import audio

        if isinstance(chunk, np.ndarray):
            n = chunk.shape[0]
        elif self.encoding == OGG_OPUS:
            if self._counter is None:
                self._counter = ChunkEncoder(OGG_OPUS, self.sample_rate)
            n = self._counter._count(bytes(chunk))
        else:
            n = len(chunk) // audio.bytes_per_sample(self.encoding)
        return n / self.sample_rate


def paced(
    chunks: Iterable[Chunk], sample_rate: int, encoding: str = PCM16, clock=time.monotonic
) -> Iterator[Chunk]:
    """Yield chunks no faster than real time: chunk i leaves when the audio before it has played.

    Models a microphone: the gateway sees audio arrive as a live caller would send it.
    """
    t0 = clock()
    ahead = 0.0
    duration = _Durations(sample_rate, encoding)
    for chunk in chunks:
        wait = t0 + ahead - clock()
        if wait > 0:
            time.sleep(wait)
        yield chunk
        ahead += duration(chunk)


async def apaced(
    chunks: Iterable[Chunk] | AsyncIterable[Chunk],
    sample_rate: int,
    encoding: str = PCM16,
    clock=time.monotonic,
) -> AsyncIterator[Chunk]:
    """Async `paced`: accepts a sync or async iterable of chunks."""
    t0 = clock()
    ahead = 0.0
    duration = _Durations(sample_rate, encoding)
    async for chunk in _aiter(chunks):
        wait = t0 + ahead - clock()
        if wait > 0:
            await asyncio.sleep(wait)
        yield chunk
        ahead += duration(chunk)


async def _aiter(chunks: Iterable[Chunk] | AsyncIterable[Chunk]) -> AsyncIterator[Chunk]:
    if hasattr(chunks, "__aiter__"):
        async for c in chunks:  # type: ignore[union-attr]
            yield c
    else:
        for c in chunks:  # type: ignore[union-attr]
            yield c


def _audio_request(data: bytes) -> gateway_pb2.ConverseRequest:
    return gateway_pb2.ConverseRequest(audio=gateway_pb2.AudioChunk(data=data))


class _RetryBuffer:
    """What both retry sources share: chunks pulled from the caller, kept from absolute
    index `_base` on until the session has started, so a refused attempt's retry resends
    them; the current attempt's `generation` (an older attempt's stream stops)."""

    def __init__(self, encoding: str, on_sent, before_send, sample_rate: int) -> None:
        self._encoding = encoding
        self._encoder = ChunkEncoder(encoding, sample_rate)
        self.bytes_sent = 0  # audio bytes in the current attempt's requests
        self._on_sent = on_sent
        self._before_send = before_send
        self._pending: list[tuple[bytes, int]] = []  # chunks from absolute index `_base` on
        self._base = 0
        self._exhausted = False
        self._started = False
        self._generation = 0
        self.error: BaseException | None = None

    def _first_index(self) -> int:
        """Where an attempt's audio starts: the oldest chunk not yet known to be delivered."""
        return self._base if self._started else 0

    def _store(self, entry: tuple[bytes, int] | None) -> tuple[bytes, int] | None:
        """Keep a freshly pulled chunk (None: the caller's chunks ended)."""
        if entry is None:
            self._exhausted = True
            return None
        self._pending.append(entry)
        return entry

    def _drop_sent(self, i: int) -> None:
        """Once started, chunks up to `i` are never resent: forget them."""
        if self._started and i + 1 > self._base:
            drop = i + 1 - self._base
            del self._pending[:drop]
            self._base += drop

    def _request(self, entry: tuple[bytes, int]) -> gateway_pb2.ConverseRequest | None:
        """The audio request of a chunk (None for an empty one), counted as sent."""
        data, n = entry
        if not data:  # (an Ogg Opus piece may carry bytes but no whole packet yet: sent)
            return None
        if self._on_sent is not None and n:
            self._on_sent(n)
        self.bytes_sent += len(data)
        return _audio_request(data)

    def _encode(self, item: Chunk | None) -> tuple[bytes, int] | None:
        """Encode a pulled chunk; None (the caller's chunks ended) -> the encoder's tail."""
        return self._encoder.finish() if item is None else self._encoder.encode(item)


class RetrySource(_RetryBuffer):
    """The caller's chunks, pulled once, sent again by each retry until the session has
    started.

    gRPC's sync client consumes request iterators on its own thread, so pulls are serialised
    by a lock: a refused attempt's generator may still be inside `next()` when the retry
    begins, and the chunk it pulls must reach the retry, not vanish.

    With `start_gate` (a persona session) nothing is pulled from the caller before the
    session started (its first reply): a real-time source (`paced`) starts its clock at the
    first pull, and the gateway reads no audio while it applies the persona's prompt.
    """

    # How often a gated request stream checks whether its attempt is still the current one.
    GATE_POLL_S = 0.05

    def __init__(
        self,
        chunks: Iterable[Chunk],
        encoding: str,
        on_sent=None,
        before_send=None,
        sample_rate: int = 24000,
        start_gate: bool = False,
    ) -> None:
        super().__init__(encoding, on_sent, before_send, sample_rate)
        self._it = iter(chunks)
        self._pull_lock = threading.Lock()
        self._lock = threading.Lock()
        self._gate = start_gate
        self._started_evt = threading.Event()

    def new_attempt(self) -> int:
        with self._lock:
            self._generation += 1
            self.bytes_sent = 0
            return self._generation

    def mark_started(self) -> None:
        with self._lock:
            self._started = True
        self._started_evt.set()

    def close(self) -> None:
        """No attempt will follow: end every request stream still waiting at the gate."""
        with self._lock:
            self._generation += 1
        self._started_evt.set()

    def _wait_started(self, generation: int) -> bool:
        """Wait at the gate until the session started; False if this attempt ended first."""
        while not self._started_evt.wait(self.GATE_POLL_S):
            if generation != self._generation:
                return False
        return generation == self._generation

    def _get(self, i: int) -> tuple[bytes, int] | None:
        with self._pull_lock:
            with self._lock:
                if i - self._base < len(self._pending):
                    return self._pending[i - self._base]
                if self._exhausted:
                    return None
            try:
                entry = self._encode(next(self._it, None))
            except Exception as exc:  # surfaced by the conversation, not lost in grpc's thread
                self.error = exc
                entry = None
            with self._lock:
                return self._store(entry)

    def _sent(self, i: int) -> None:
        with self._lock:
            self._drop_sent(i)

    def requests(
        self, first: gateway_pb2.ConverseRequest, generation: int
    ) -> Iterator[gateway_pb2.ConverseRequest]:
        """The request stream of one attempt: the config, then every chunk from the start."""
        yield first
        if self._gate and not self._wait_started(generation):
            return
        i = self._first_index()
        while True:
            if self._before_send is not None:
                self._before_send()
            entry = self._get(i)
            if entry is None or generation != self._generation:
                return
            request = self._request(entry)
            if request is not None:
                yield request
            self._sent(i)
            i += 1


class AsyncRetrySource(_RetryBuffer):
    """`RetrySource` for asyncio: one event loop, so only the pull needs serialising.

    It also holds audio back until the session has started (first reply) or `start_gate_s`
    passed (None: until it started, for a persona session, like `RetrySource`'s gate).
    grpc.aio reports a failed write as INTERNAL and overwrites the server's real status
    (grpc/grpc#36066), so audio written while the gateway refuses the session would turn a
    retryable RESOURCE_EXHAUSTED into INTERNAL. Waiting for SessionStarted costs one round trip
    at the start; the audio is not lost, only queued.
    """

    def __init__(
        self,
        chunks: Iterable[Chunk] | AsyncIterable[Chunk],
        encoding: str,
        on_sent=None,
        start_gate_s: float | None = 2.0,
        before_send=None,
        sample_rate: int = 24000,
    ) -> None:
        super().__init__(encoding, on_sent, before_send, sample_rate)
        self._it = _aiter(chunks).__aiter__()
        self._gate_s = start_gate_s
        self._started_evt = asyncio.Event()
        self._pull_lock = asyncio.Lock()

    def new_attempt(self) -> int:
        self._generation += 1
        self.bytes_sent = 0
        return self._generation

    def mark_started(self) -> None:
        self._started = True
        self._started_evt.set()

    def close(self) -> None:
        """No attempt will follow: wake and end every request stream still waiting."""
        self._generation += 1
        self._started_evt.set()

    async def _get(self, i: int) -> tuple[bytes, int] | None:
        async with self._pull_lock:
            if i - self._base < len(self._pending):
                return self._pending[i - self._base]
            if self._exhausted:
                return None
            try:
                entry = self._encode(await self._it.__anext__())
            except StopAsyncIteration:
                entry = self._encode(None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.error = exc
                entry = None
            return self._store(entry)

    async def requests(
        self, first: gateway_pb2.ConverseRequest, generation: int
    ) -> AsyncIterator[gateway_pb2.ConverseRequest]:
        yield first
        if not self._started and (self._gate_s is None or self._gate_s > 0):
            try:
                await asyncio.wait_for(self._started_evt.wait(), self._gate_s)
            except asyncio.TimeoutError:
                pass  # a gateway that waits for audio before answering: send it anyway
        i = self._first_index()
        while True:
            if self._before_send is not None:
                await self._before_send()
            entry = await self._get(i)
            if entry is None or generation != self._generation:
                return
            request = self._request(entry)
            if request is not None:
                yield request
            self._drop_sent(i)
            i += 1
