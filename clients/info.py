"""What a gateway offers (`Gateway.Info`), as typed values: its named voices and whether a
persona model is behind it. Fields mirror `GatewayInfo` / `VoiceInfo` in gateway.proto."""

from __future__ import annotations

from dataclasses import dataclass

from moshi_grpc.v1 import gateway_pb2


@dataclass(frozen=True)
class VoiceInfo:
    """A named voice: `voice_id` for `Persona.named`, its length and Mimi frames (80 ms)."""

    voice_id: str
    duration_s: float
    frames: int


@dataclass(frozen=True)
class GatewayInfo:
    """The gateway's voices, whether some LM replica behind it serves a persona model, and
    its version."""

    voices: tuple[VoiceInfo, ...]
    persona: bool
    version: str

    @classmethod
    def from_proto(cls, msg: gateway_pb2.GatewayInfo) -> GatewayInfo:
        voices = tuple(VoiceInfo(v.voice_id, v.duration_s, v.frames) for v in msg.voices)
        return cls(voices, msg.persona, msg.version)
