"""`ConverseResult`: a finished session gathered into audio, transcript and events."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .events import (
    AudioFrame,
    BudgetMissed,
    FramesDropped,
    ReplyEvent,
    SessionStarted,
    SessionSummary,
    TextPiece,
)
from .latency import LatencyStats

# Called with every event as it arrives (progress bars, live playback).
EventCallback = Callable[[ReplyEvent], None]


@dataclass
class ConverseResult:
    """Everything a session produced, in arrival order.

    `audio` is the reply as float32 samples at `sample_rate` (frames in index order, silence
    frames included so the reply stays aligned with the input); `transcript` joins the text
    pieces; `events` keeps every typed event except audio frames. `data` is the reply as it
    came over the wire (frames' bytes in index order; for Ogg Opus a complete .opus stream)
    and `bytes_sent` the audio bytes sent, for bit-rate figures.
    """

    sample_rate: int
    audio: np.ndarray
    transcript: str
    frames: int
    silence_frames: int
    started: SessionStarted | None
    summary: SessionSummary | None
    latency: LatencyStats
    attempts: int
    events: list[ReplyEvent] = field(default_factory=list)
    data: bytes = b""
    bytes_sent: int = 0

    @property
    def budget_misses(self) -> int:
        return sum(1 for e in self.events if isinstance(e, BudgetMissed))

    @property
    def frames_dropped(self) -> int:
        return sum(e.count for e in self.events if isinstance(e, FramesDropped))

    @staticmethod
    def builder() -> _Builder:
        """Accumulate events yourself (`add(event)`), then `build(conversation)`."""
        return _Builder()

    @classmethod
    def gather(cls, conversation, on_event: EventCallback | None = None) -> ConverseResult:
        """Iterate a sync `Conversation` to its end."""
        b = _Builder()
        for event in conversation:
            b.add(event)
            if on_event is not None:
                on_event(event)
        return b.build(conversation)

    @classmethod
    async def agather(cls, conversation, on_event: EventCallback | None = None) -> ConverseResult:
        """Iterate an `AsyncConversation` to its end."""
        b = _Builder()
        async for event in conversation:
            b.add(event)
            if on_event is not None:
                on_event(event)
        return b.build(conversation)


class _Builder:
    def __init__(self) -> None:
        self.frames: dict[int, AudioFrame] = {}
        self.text: list[str] = []
        self.events: list[ReplyEvent] = []

    def add(self, event: ReplyEvent) -> None:
        if isinstance(event, AudioFrame):
            self.frames[event.frame_index] = event
            return
        if isinstance(event, TextPiece):
            self.text.append(event.text)
        self.events.append(event)

    def build(self, conversation) -> ConverseResult:
        session = conversation.session
        ordered = [self.frames[i] for i in sorted(self.frames)]
        if ordered:
            audio = np.concatenate([f.samples for f in ordered]).astype(np.float32, copy=False)
        else:
            audio = np.zeros(0, dtype=np.float32)
        return ConverseResult(
            sample_rate=session.sample_rate,
            audio=audio,
            transcript="".join(self.text).strip(),
            frames=len(ordered),
            silence_frames=sum(1 for f in ordered if f.silence),
            started=conversation.started,
            summary=conversation.summary,
            latency=conversation.latency(),
            attempts=conversation.attempts,
            events=self.events,
            data=b"".join(f.data for f in ordered),
            bytes_sent=getattr(conversation, "bytes_sent", 0),
        )
