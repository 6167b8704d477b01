"""Client-side per-frame latency: input frame t complete (sent) -> output frame t received.

The gateway reports its own percentiles in the session summary; this measures what the caller
actually sees, network and client scheduling included, so the two can be compared.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass

import numpy as np

FRAME_SECONDS = 0.08  # one Mimi frame: 1920 samples at 24 kHz


@dataclass(frozen=True)
class LatencyStats:
    """Percentiles of client-observed per-frame latency, in milliseconds."""

    frames: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    first_audio_ms: float | None

    @classmethod
    def from_samples(cls, lat_ms: list[float], first_audio_ms: float | None) -> LatencyStats:
        if not lat_ms:
            return cls(0, 0.0, 0.0, 0.0, 0.0, first_audio_ms)
        a = np.asarray(lat_ms, dtype=np.float64)
        p50, p95, p99 = np.percentile(a, [50, 95, 99])
        return cls(len(a), float(p50), float(p95), float(p99), float(a.max()), first_audio_ms)


class LatencyTracker:
    """Records when each input frame was completely sent and when its output arrived.

    Chunks may be any size, so frame t is "sent" at the first chunk that brings the running
    sample count to (t + 1) frames at the session's rate.
    """

    def __init__(self, sample_rate: int, clock=time.monotonic) -> None:
        self._frame_samples = sample_rate * FRAME_SECONDS
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        """Forget everything (a retried session start sends the audio again from frame 0)."""
        self._sent_samples = 0
        self._frame_sent_at: list[float] = []
        self._latencies_ms: list[float] = []
        self._t0: float | None = None
        self._first_audio_ms: float | None = None

    def on_sent(self, n_samples: int) -> None:
        now = self._clock()
        if self._t0 is None:
            self._t0 = now
        self._sent_samples += n_samples
        complete = math.floor(self._sent_samples / self._frame_samples + 1e-9)
        while len(self._frame_sent_at) < complete:
            self._frame_sent_at.append(now)

    def on_frame(self, frame_index: int) -> float | None:
        """Output frame `frame_index` arrived; its latency in ms if its input was sent."""
        now = self._clock()
        if self._first_audio_ms is None and self._t0 is not None:
            self._first_audio_ms = (now - self._t0) * 1000.0
        if frame_index >= len(self._frame_sent_at):
            return None
        lat = (now - self._frame_sent_at[frame_index]) * 1000.0
        self._latencies_ms.append(lat)
        return lat

    @property
    def frames_sent(self) -> int:
        return len(self._frame_sent_at)

    def stats(self) -> LatencyStats:
        return LatencyStats.from_samples(self._latencies_ms, self._first_audio_ms)


class SendWindow:
    """Bounds the frames in flight: input frames sent whose output has not come back.

    "As fast as allowed" without tripping the gateway's backlog limit (which drops frames):
    the sender waits while `max_frames` are in flight. A stall longer than `stall_s` (a gateway
    that holds output back) lets one more chunk through rather than deadlocking.
    """

    def __init__(self, tracker: LatencyTracker, max_frames: int, stall_s: float = 2.0) -> None:
        if max_frames < 1:
            raise ValueError(f"window must be >= 1 frame, got {max_frames}")
        self._tracker = tracker
        self._max = max_frames
        self._stall_s = stall_s
        self._received = 0
        self._cond = threading.Condition()
        self._event: asyncio.Event | None = None

    def reset(self) -> None:
        self._received = 0

    def on_frame(self, frame_index: int) -> None:
        with self._cond:
            self._received = max(self._received, frame_index + 1)
            self._cond.notify_all()
        if self._event is not None:
            self._event.set()

    def _open(self) -> bool:
        return self._tracker.frames_sent - self._received < self._max

    def wait(self) -> None:
        with self._cond:
            self._cond.wait_for(self._open, timeout=self._stall_s)

    async def await_open(self) -> None:
        if self._event is None:
            self._event = asyncio.Event()
        deadline = time.monotonic() + self._stall_s
        while not self._open():
            self._event.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._event.wait(), remaining)
            except asyncio.TimeoutError:
                return
