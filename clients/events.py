"""Typed reply events of a Converse session.

The wire messages (`ConverseResponse`) are a nest of oneofs; callers want one flat, typed value
per reply they can `match` on or `isinstance`-check. Each dataclass here mirrors one reply kind
of protos/moshi_grpc/v1/gateway.proto, with the same field names, so the proto comments are the
documentation of the fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np

from moshi_grpc.v1 import gateway_pb2

PCM16 = "pcm16"
FLOAT32 = "float32"
MULAW = "mulaw"
ALAW = "alaw"
OGG_OPUS = "opus"
ENCODINGS = {
    PCM16: gateway_pb2.AUDIO_ENCODING_PCM16,
    FLOAT32: gateway_pb2.AUDIO_ENCODING_FLOAT32,
    MULAW: gateway_pb2.AUDIO_ENCODING_MULAW,
    ALAW: gateway_pb2.AUDIO_ENCODING_ALAW,
    OGG_OPUS: gateway_pb2.AUDIO_ENCODING_OGG_OPUS,
}


def decode_samples(data: bytes, encoding: str) -> np.ndarray:
    """Raw samples of a fixed-size encoding (not Ogg Opus) -> float32 in [-1, 1]."""
    from moshi_grpc import audio

    return audio.decode_samples(data, encoding, allow_empty=True)


@dataclass(frozen=True)
class AudioFrame:
    """One 80 ms output frame (answers input frame `frame_index`).

    `data` is the wire bytes in the session's encoding; for Ogg Opus, the next bytes of the
    reply's stream (the session decodes them in order into `decoded`)."""

    frame_index: int
    data: bytes
    silence: bool
    encoding: str
    sample_rate: int
    decoded: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def samples(self) -> np.ndarray:
        """The frame as float32 samples in [-1, 1] at `sample_rate`. For Ogg Opus: what the
        session's stream decoder released with these bytes (the decoder holds a few ms back,
        so these need not be exactly 80 ms; their concatenation is the reply)."""
        if self.decoded is not None:
            return self.decoded
        return decode_samples(self.data, self.encoding)


@dataclass(frozen=True)
class TextPiece:
    """A piece of Moshi's inner-monologue text, produced by output frame `frame_index`."""

    frame_index: int
    text: str


@dataclass(frozen=True)
class PersonaStarted:
    """How a session's persona was applied before it went live (`voice_id` "" for an inline
    voice; `voice_encode_ms` 0 when the named voice's codes were kept)."""

    voice_id: str
    voice_frames: int
    prompt_frames: int
    cached: bool
    voice_encode_ms: float
    prompt_ready_ms: float


@dataclass(frozen=True)
class SessionStarted:
    """First event of every session: its id, the replicas it is pinned to, effective limits,
    and, with a persona, how it was applied."""

    session_id: str
    codec_replica: str
    lm_replica: str
    budget_ms: int
    max_consecutive_misses: int
    sample_rate: int
    model: str
    persona: PersonaStarted | None = None


@dataclass(frozen=True)
class BudgetMissed:
    """Output frame `frame_index` missed its deadline by `late_ms` and was sent as silence."""

    frame_index: int
    late_ms: float
    consecutive: int


@dataclass(frozen=True)
class FramesDropped:
    """`count` input frames from `first_frame_index` were dropped (backlog full)."""

    first_frame_index: int
    count: int
    reason: str


@dataclass(frozen=True)
class Failover:
    """The LM replica failed and the session moved to another one."""

    from_replica: str
    to_replica: str
    frames_lost: int


@dataclass(frozen=True)
class TextPolicyApplied:
    """The gateway's text safety hook acted on the text piece of output frame `frame_index`:
    `action` is "redact", "mute" (audio muted for `mute_frames` frames) or "end"."""

    frame_index: int
    action: str
    rule: str
    mute_frames: int


@dataclass(frozen=True)
class SessionSummary:
    """Server-side totals of a session (see `SessionSummary` in gateway.proto)."""

    frames_in: int
    frames_out: int
    frames_late: int
    frames_dropped: int
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    duration_s: float
    reason: str


@dataclass(frozen=True)
class SessionEnded:
    """Last event of a session the gateway ended, with its summary."""

    summary: SessionSummary = field(
        default_factory=lambda: SessionSummary(0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, "")
    )


ReplyEvent = Union[
    AudioFrame,
    TextPiece,
    SessionStarted,
    BudgetMissed,
    FramesDropped,
    Failover,
    SessionEnded,
    TextPolicyApplied,
]


def _summary(msg: gateway_pb2.SessionSummary) -> SessionSummary:
    return SessionSummary(
        frames_in=msg.frames_in,
        frames_out=msg.frames_out,
        frames_late=msg.frames_late,
        frames_dropped=msg.frames_dropped,
        latency_p50_ms=msg.latency_p50_ms,
        latency_p95_ms=msg.latency_p95_ms,
        latency_p99_ms=msg.latency_p99_ms,
        duration_s=msg.duration_s,
        reason=msg.reason,
    )


def from_response(
    resp: gateway_pb2.ConverseResponse, encoding: str, sample_rate: int, decoder=None
) -> ReplyEvent | None:
    """Turn one wire reply into its typed event; None for a kind this SDK does not know yet.

    `decoder` (an `audio.StreamDecoder`, needed for Ogg Opus) decodes audio as it arrives.

    Unknown kinds are skipped rather than raised so that an older client keeps working when
    the gateway adds reply kinds (the contract only grows additively).
    """
    kind = resp.WhichOneof("kind")
    if kind == "audio":
        a = resp.audio
        decoded = None if decoder is None else decoder.decode(a.data, allow_empty=True)
        return AudioFrame(a.frame_index, a.data, a.silence, encoding, sample_rate, decoded)
    if kind == "text":
        return TextPiece(resp.text.frame_index, resp.text.text)
    if kind != "event":
        return None
    ev = resp.event
    which = ev.WhichOneof("kind")
    if which == "started":
        s = ev.started
        persona = None
        if s.HasField("persona"):
            p = s.persona
            persona = PersonaStarted(
                p.voice_id,
                p.voice_frames,
                p.prompt_frames,
                p.cached,
                p.voice_encode_ms,
                p.prompt_ready_ms,
            )
        return SessionStarted(
            s.session_id,
            s.codec_replica,
            s.lm_replica,
            s.budget_ms,
            s.max_consecutive_misses,
            s.sample_rate,
            s.model,
            persona,
        )
    if which == "budget_missed":
        b = ev.budget_missed
        return BudgetMissed(b.frame_index, b.late_ms, b.consecutive)
    if which == "frames_dropped":
        d = ev.frames_dropped
        return FramesDropped(d.first_frame_index, d.count, d.reason)
    if which == "failover":
        f = ev.failover
        return Failover(f.from_replica, f.to_replica, f.frames_lost)
    if which == "ended":
        return SessionEnded(_summary(ev.ended.summary))
    if which == "text_policy":
        p = ev.text_policy
        return TextPolicyApplied(p.frame_index, p.action, p.rule, p.mute_frames)
    return None
