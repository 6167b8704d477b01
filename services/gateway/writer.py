"""A session's replies to its client, one writer at a time.

Text, events and audio frames (in frame order, silence for frames given up at their
deadline, see budget.FrameSequencer) are written by `flush()`, called inline by whichever
task made output possible (a backend answer, a dropped frame, the deadline timer through the
session's loop): a frame's reply goes out without waking another task. A call that finds a
flush in progress only marks it dirty, and the running flush loops once more.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from moshi_grpc.services.common.metrics import GatewayMetrics
from moshi_grpc.services.gateway import replies
from moshi_grpc.services.gateway.audio_io import SessionAudio
from moshi_grpc.services.gateway.budget import Cause, Emission, FrameSequencer
from moshi_grpc.services.gateway.text_hook import TextHook


class ReplyWriter:
    """The replies of one session; `context` is its Converse call (`write`)."""

    def __init__(
        self,
        context: Any,
        seq: FrameSequencer,
        audio: SessionAudio,
        text: TextHook,
        metrics: GatewayMetrics,
        started_wall: float,
    ) -> None:
        self._write = context.write
        self.seq = seq
        self._audio = audio
        self._text = text
        self._metrics = metrics
        self._started_wall = started_wall
        self.loop = asyncio.get_running_loop()
        self.outbox: list[replies.Response] = []  # text and events for the next flush
        self.flushing = False
        self.idle = asyncio.Event()  # set while no `flush()` is writing
        self.idle.set()
        self._dirty = False
        self._ending = False  # an error ending: no more replies, the summary comes next
        self._first_audio_sent = False

    def queue(self, messages: list[replies.Response]) -> None:
        self.outbox.extend(messages)

    async def flush(self) -> bool:
        """Write everything that can leave now: text, events, audio frames in order. False
        when another call is writing (it writes this too) or the session is ending."""
        if self.flushing:
            self._dirty = True
            return False
        if self._ending:  # an error ending: the summary is the next and last reply
            return False
        self.flushing = True
        self.idle.clear()
        seq = self.seq
        try:
            while True:
                self._dirty = False
                if self.outbox:
                    pending, self.outbox = self.outbox, []
                    for msg in pending:
                        await self._write(msg)
                emissions = seq.poll(self.loop.time())
                if emissions:
                    await self._send(emissions)
                if not self._dirty:
                    break
        finally:
            self.flushing = False
            self.idle.set()
        return True

    def _audio_message(self, e: Emission) -> replies.Response:
        muted = self._text.muted(e.index)
        pcm = None if muted else e.pcm
        # Filled in place: a nested constructor would build the AudioOut and copy it.
        message = replies.Response()
        audio_out = message.audio
        audio_out.frame_index = e.index
        audio_out.data = self._audio.encode(pcm)
        audio_out.silence = pcm is None
        return message

    async def _send(self, emissions: list[Emission]) -> None:
        write = self._write
        m = self._metrics
        seq = self.seq
        loop = self.loop
        for e, event in replies.miss_events(emissions):
            if e.cause is Cause.LATE:
                m.budget_misses.inc()
                m.frames_dropped.labels("budget").inc()
            elif event is not None:  # the first of a run of dropped frames
                reason = "stalled" if e.stalled else "overflow"
                m.frames_dropped.labels(reason).inc(event.event.frames_dropped.count)
            if event is not None:
                await write(event)
            await write(self._audio_message(e))
            latency = seq.written(e, loop.time())
            m.frames.inc()
            if latency is not None:
                m.frame_latency_seconds.observe(latency)
            if not self._first_audio_sent:
                self._first_audio_sent = True
                m.time_to_first_audio_seconds.observe(time.monotonic() - self._started_wall)

    async def quiesce(self, timeout_s: float) -> bool:
        """An error ending: stop writing replies and wait (at most `timeout_s`) for a write
        in progress to finish, so that the summary comes after it. False on timeout (a
        client that does not read: the summary could not be written either)."""
        self._ending = True
        if not self.flushing:
            return True
        try:
            await asyncio.wait_for(self.idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
