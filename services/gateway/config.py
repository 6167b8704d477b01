"""Gateway settings (from flags) and validation of a client's `SessionConfig`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moshi_grpc import audio
from moshi_grpc.services.common.errors import InvalidInput
from moshi_grpc.v1 import common_pb2, gateway_pb2

ENCODING_NAMES = {
    gateway_pb2.AUDIO_ENCODING_PCM16: audio.PCM16,
    gateway_pb2.AUDIO_ENCODING_FLOAT32: audio.FLOAT32,
    gateway_pb2.AUDIO_ENCODING_MULAW: audio.MULAW,
    gateway_pb2.AUDIO_ENCODING_ALAW: audio.ALAW,
    gateway_pb2.AUDIO_ENCODING_OGG_OPUS: audio.OGG_OPUS,
}

MAX_BUDGET_MS = 10_000
MIN_BUDGET_MS = 1


@dataclass(frozen=True)
class CostSettings:
    """How a new session's frame cost is predicted (admission, gateway/cost.py)."""

    batch_wait_ms: float = 5.0  # the backends' batching wait per stage (their --max-wait-ms)
    # The cost assumed per stage on a replica whose Info reports no bucket timings yet.
    unmeasured_stage_ms: float = 10.0
    # How long a measured sample counts (it decays with a half-life of a third of that).
    sample_ttl_s: float = 30.0


@dataclass
class GatewaySettings:
    """Per-gateway defaults and limits; sessions may override budget and miss limit."""

    default_budget_ms: int = 200
    default_max_consecutive_misses: int = 25  # 2 s of consecutive misses
    # Frames allowed at the backends at once per session before input frames are dropped.
    max_backlog_frames: int = 8
    # INPUT_PACING_FLOW_CONTROL sessions: frames at the backends at once before the gateway
    # stops reading the client (one per pipeline stage keeps encode, step and decode busy).
    flow_window_frames: int = 3
    # Frames received but not yet sent back before the gateway stops reading the client
    # (a client that sends but does not read gets gRPC flow control, not unbounded memory).
    max_pending_frames: int = 64
    resample_quality: str = "LQ"  # soxr quality: LQ keeps ~20 ms hold-back, HQ ~38 ms
    idle_timeout_s: float = 30.0  # no client message for this long ends the session
    # A session that reaches this length ends with DEADLINE_EXCEEDED, reason
    # "max_session_length" (after its summary). 0 = unlimited.
    max_session_s: float = 0.0
    # Live sessions per client (keyed on SessionConfig.client_id, else the peer's IP address);
    # more are refused with RESOURCE_EXHAUSTED. 0 = no limit.
    max_sessions_per_client: int = 0
    # LM failover: move a session to another LM replica when its replica fails, replaying at
    # most this many steps of history (the LM's context: 3000 steps = 240 s).
    lm_failover: bool = True
    lm_history_steps: int = 3000
    retry_after_ms: int = 1000  # hint for refused sessions
    cost: CostSettings = field(default_factory=CostSettings)  # admission from measured cost
    # An error ending waits this long for a reply being written before the summary.
    summary_wait_s: float = 2.0
    # How sessions reach the backends: "mux" (one shared EncodeMux/StepMux/DecodeMux stream
    # per replica, many sessions per message) or "per-session" (Encode/Step/Decode streams
    # of their own). See gateway/streams.py.
    backend_streams: str = "mux"
    # A busy mux stream's sender waits this long after its first pending entry so that
    # more sessions' entries share the message (fewer messages, less CPU per frame); up to
    # this much added latency per stage, none on a stream too quiet to collect another
    # entry in that time. 0 (the default): no waiting; CPU traded for latency on request.
    # See gateway/streams.py `coalesce_wait`.
    mux_coalesce_ms: float = 0.0
    refresh_interval_s: float = 0.5  # replica discovery, health and Info polling
    probe_timeout_s: float = 1.0
    # Text safety hook: a text_policy.TextPolicy every text piece passes (None = off).
    text_policy: Any = None
    # Persona sessions (persona.py, voices.py): the named voices' directory (WAV files,
    # named by their stems; None = none), the longest voice taken (inline or named), and
    # how long a backend may take over one answer before the session goes live (the LM
    # applying a persona prompt, the codec one voice frame) before the session is refused
    # with DEADLINE_EXCEEDED; kept below the backends' idle timeout (30 s by default), which
    # a session's quiet streams would hit meanwhile.
    voice_dir: str | None = None
    max_voice_s: float = 30.0
    open_answer_timeout_s: float = 20.0


@dataclass
class SessionParams:
    """A validated SessionConfig with the gateway's defaults applied."""

    sample_rate: int
    encoding: str  # one of audio.ENCODINGS
    encoding_enum: int
    sampling: common_pb2.SamplingParams
    seed: int | None
    budget_ms: int
    max_consecutive_misses: int
    client_id: str
    input_pacing: int = gateway_pb2.INPUT_PACING_REAL_TIME
    persona: Any = None  # persona.PersonaRequest: the checked persona (None: none)


def _check_sampling(sp: common_pb2.SamplingParams) -> None:
    for name in ("text_temperature", "audio_temperature"):
        if sp.HasField(name):
            value = getattr(sp, name)
            if not math.isfinite(value) or value < 0:
                raise InvalidInput(f"sampling.{name} must be a finite number >= 0, got {value}")
    for name in ("text_top_k", "audio_top_k"):
        if sp.HasField(name) and getattr(sp, name) < 0:
            raise InvalidInput(f"sampling.{name} must be >= 0, got {getattr(sp, name)}")


def session_params(config: gateway_pb2.SessionConfig, settings: GatewaySettings) -> SessionParams:
    """Validate a SessionConfig (InvalidInput with a clear message) and apply defaults."""
    rate = config.sample_rate
    if not audio.MIN_RATE <= rate <= audio.MAX_RATE:
        raise InvalidInput(
            f"sample_rate must be between {audio.MIN_RATE} and {audio.MAX_RATE} Hz, got {rate}"
        )
    encoding = ENCODING_NAMES.get(config.encoding)
    if encoding is None:
        names = ", ".join(gateway_pb2.AudioEncoding.Name(e) for e in ENCODING_NAMES)
        raise InvalidInput(f"encoding must be one of {names}")
    try:
        audio.check_rate(encoding, rate)
    except audio.AudioFormatError as exc:
        raise InvalidInput(str(exc)) from None
    _check_sampling(config.sampling)
    budget = config.budget_ms if config.HasField("budget_ms") else settings.default_budget_ms
    if not MIN_BUDGET_MS <= budget <= MAX_BUDGET_MS:
        raise InvalidInput(f"budget_ms must be between 1 and {MAX_BUDGET_MS}, got {budget}")
    misses = (
        config.max_consecutive_misses
        if config.HasField("max_consecutive_misses")
        else settings.default_max_consecutive_misses
    )
    if len(config.client_id) > 256:
        raise InvalidInput("client_id must be at most 256 characters")
    pacing = config.input_pacing or gateway_pb2.INPUT_PACING_REAL_TIME
    if pacing not in (gateway_pb2.INPUT_PACING_REAL_TIME, gateway_pb2.INPUT_PACING_FLOW_CONTROL):
        raise InvalidInput(
            "input_pacing must be INPUT_PACING_REAL_TIME or INPUT_PACING_FLOW_CONTROL"
        )
    return SessionParams(
        sample_rate=rate,
        encoding=encoding,
        encoding_enum=config.encoding,
        sampling=config.sampling,
        seed=config.seed if config.HasField("seed") else None,
        budget_ms=int(budget),
        max_consecutive_misses=int(misses),
        client_id=config.client_id,
        input_pacing=pacing,
    )
