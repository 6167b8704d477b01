"""Persona sessions (issue 22): a voice and a role prompt applied before the session goes live.

A session whose `SessionConfig.persona` is set goes through these steps, each owned here:

1. `Personas.resolve` (the servicer, before admission): the persona is checked and its voice
   prepared (voices.py): an unknown voice_id is NOT_FOUND, an empty prompt, a voice that
   does not decode, is too long, silent or too short are INVALID_ARGUMENT. Nothing of a
   backend is touched yet, so a bad persona costs no other session anything.
2. Admission by capability (`lm_need`): a persona session goes only to LM replicas whose Info
   says `persona`, a plain session only to the others; when no replica of the model it needs
   is behind the gateway at all, FAILED_PRECONDITION naming it (retrying cannot help).
3. The start step (`apply`, a `Pipeline.start` step of the Moshi pipeline): the voice's codes
   (kept for a named voice, else encoded on the session's leased codec replica through a
   fresh Encode stream) and the prompt go into `OpenContext.values`, from which the LM
   stage's open message takes them (`prompt`).
4. The LM's answer to that open (`PROMPT_READY`, the stage's `OpenAnswer`): the LM link
   sends the open and waits for `StepOutput.prompt` (PromptReady) before the session goes
   live; only then is SessionStarted written (with `started()`: PersonaStarted) and the
   client's audio read. After an LM failover the new replica's open carries the same
   persona and answers it the same way; the link never takes that answer for a frame's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moshi_grpc.services.common.errors import InvalidInput
from moshi_grpc.services.common.metrics import GatewayMetrics
from moshi_grpc.services.gateway.admission import Need
from moshi_grpc.services.gateway.config import GatewaySettings
from moshi_grpc.services.gateway.pipeline import OpenAnswer, OpenContext, Stage
from moshi_grpc.services.gateway.voices import (
    Voice,
    VoiceDirectory,
    decode_voice,
    encode_on,
    voice_frames,
)
from moshi_grpc.v1 import common_pb2, gateway_pb2, lm_pb2

log = logging.getLogger(__name__)

PERSONA_BACKEND = "lm"  # the backend kind whose Info says whether it takes a persona
PROMPT = "persona_prompt"  # OpenContext.values key: the LM open's PersonaPrompt


@dataclass
class PersonaRequest:
    """One session's checked persona, and what its start did (for SessionStarted)."""

    voice: Voice
    prompt: str
    personas: Personas
    voice_encode_s: float = 0.0  # 0: the named voice's codes were kept
    ready: lm_pb2.PromptReady | None = None
    ready_s: float = 0.0  # the LM open sent -> its PromptReady, as the gateway saw it

    @property
    def voice_label(self) -> str:
        return "named" if self.voice.named else "inline"


class Personas:
    """The gateway's persona settings: its voice directory, the inline voice limit, metrics."""

    def __init__(
        self,
        voices: VoiceDirectory,
        max_voice_s: float,
        metrics: GatewayMetrics,
        retry_after_ms: int,
        answer_timeout_s: float,
    ) -> None:
        self.voices = voices
        self.max_voice_s = max_voice_s
        self.metrics = metrics
        self.retry_after_ms = retry_after_ms  # the hint when the voice's codec is full
        self.answer_timeout_s = answer_timeout_s  # per voice frame's codes at the codec

    @classmethod
    def of(
        cls, settings: GatewaySettings, metrics: GatewayMetrics, voices: VoiceDirectory
    ) -> Personas:
        """The gateway's persona settings from its settings."""
        return cls(
            voices,
            settings.max_voice_s,
            metrics,
            settings.retry_after_ms,
            settings.open_answer_timeout_s,
        )

    async def resolve(self, persona: gateway_pb2.Persona) -> PersonaRequest:
        """A session's persona, checked and its voice prepared (see the module docstring).
        An inline voice is decoded and normalised in a worker thread (the loudness filters
        take ~0.3 s of CPU per 10 s of voice)."""
        if not persona.prompt.strip():
            raise InvalidInput("persona.prompt is empty; a persona needs a role prompt")
        kind = persona.WhichOneof("voice")
        if kind is None:
            raise InvalidInput(
                "persona has no voice: set persona.voice_id (one of the gateway's voices, "
                "Gateway.Info) or persona.voice_audio"
            )
        if kind == "voice_id":
            voice: Voice = self.voices.get(persona.voice_id)
        else:
            voice = await asyncio.to_thread(self._inline, persona.voice_audio)
        return PersonaRequest(voice=voice, prompt=persona.prompt, personas=self)

    def _inline(self, voice_audio: gateway_pb2.VoiceAudio) -> Voice:
        samples, rate = decode_voice(voice_audio)
        frames = voice_frames(samples, rate, "persona.voice_audio", self.max_voice_s)
        return Voice(frames=frames, duration_s=samples.size / rate)


def lm_need(persona: bool) -> Need:
    """What a session asks of LM replicas: a persona model for a persona, another model
    otherwise (a persona model needs a persona in every session)."""

    def accepts(info: common_pb2.BackendInfo) -> bool:
        return info.persona == persona

    def refusal(infos: Sequence[common_pb2.BackendInfo]) -> str:
        models = ", ".join(sorted({f"{i.model_name}/{i.config_name}" for i in infos}))
        if persona:
            return (
                f"no LM replica behind this gateway serves a persona model (they serve "
                f"{models}); a persona needs a PersonaPlex model, e.g. "
                "`moshi-grpc lm --lm-config personaplex-7b`, or drop SessionConfig.persona"
            )
        return (
            f"every LM replica behind this gateway serves a persona model ({models}), which "
            "takes only sessions with a persona: set SessionConfig.persona (a voice and a "
            "prompt)"
        )

    return Need(accepts, refusal)


def persona_served(infos: Sequence[common_pb2.BackendInfo]) -> bool:
    """Whether any of these LM replicas' Info says it serves a persona model."""
    return any(info.persona for info in infos)


async def apply(ctx: OpenContext, encode: Stage) -> None:
    """The start step: the voice's codes (kept, or encoded on the leased codec replica
    through `encode`'s RPC) and the prompt, into `ctx.values[PROMPT]` for the LM's open."""
    request: PersonaRequest | None = ctx.params.persona
    if request is None:
        return
    replica = ctx.lease.replicas[encode.backend.kind]
    info = replica.info
    model = f"{info.model_name}/{info.config_name}" if info is not None else replica.address
    personas = request.personas

    async def encode_frames(frames) -> list[int]:
        return await encode_on(
            replica,
            encode,
            frames,
            metadata=ctx.metadata,
            session_id=ctx.session_id,
            retry_ms=personas.retry_after_ms,
            answer_timeout_s=personas.answer_timeout_s,
        )

    t0 = time.perf_counter()
    codes, encoded = await request.voice.codes(encode_frames, model)
    if encoded:
        request.voice_encode_s = time.perf_counter() - t0
        personas.metrics.voice_encode_seconds.observe(request.voice_encode_s)
    ctx.values[PROMPT] = lm_pb2.PersonaPrompt(voice_codes=codes, text=request.prompt)


def prompt(ctx: OpenContext) -> lm_pb2.PersonaPrompt | None:
    """The PersonaPrompt of the LM stage's open (None: the session has no persona)."""
    return ctx.values.get(PROMPT)


def _ready(ctx: OpenContext, msg: Any, seconds: float) -> None:
    request: PersonaRequest = ctx.params.persona
    request.ready = msg.prompt
    request.ready_s = seconds
    request.personas.metrics.prompt_ready_seconds.observe(seconds)


# The LM's answer to an open with a persona: one StepOutput with `prompt` set, before any
# frame's (docs/ARCHITECTURE.md, "Before live").
PROMPT_READY = OpenAnswer(
    expected=lambda open_msg: open_msg.HasField("persona"),
    matches=lambda msg: msg.HasField("prompt"),
    received=_ready,
)


def started(request: PersonaRequest | None) -> gateway_pb2.PersonaStarted | None:
    """SessionStarted.persona: how the session's persona was applied."""
    if request is None or request.ready is None:
        return None
    return gateway_pb2.PersonaStarted(
        voice_id=request.voice.name,
        voice_frames=len(request.voice.frames),
        prompt_frames=request.ready.prefix_frames,
        cached=request.ready.cached,
        voice_encode_ms=request.voice_encode_s * 1000.0,
        prompt_ready_ms=request.ready_s * 1000.0,
    )


def count_started(request: PersonaRequest | None) -> None:
    """`moshi_gateway_persona_sessions_total{voice, cached}` for a session that went live."""
    if request is None or request.ready is None:
        return
    cached = "true" if request.ready.cached else "false"
    request.personas.metrics.persona_sessions.labels(request.voice_label, cached).inc()
