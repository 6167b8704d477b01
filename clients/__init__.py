"""Python SDK for the moshi-grpc gateway's public `Converse` API.

- `ConverseClient` (blocking) and `AsyncConverseClient` (asyncio): open a session over audio
  chunks (bytes, numpy arrays, a wav file), iterate over typed reply events.
- Events: `AudioFrame`, `TextPiece`, `SessionStarted`, `BudgetMissed`, `FramesDropped`,
  `Failover`, `TextPolicyApplied`, `SessionEnded` (with a `SessionSummary`).
- Options: `SessionOptions` (rate, encoding, sampling, seed, budget, input pacing:
  `REAL_TIME` for live audio, `FLOW_CONTROL` for files, a `Persona`: voice and role
  prompt), `TlsOptions`, `RetryPolicy`; failures raise `ConverseError` (gRPC code,
  details, retry hint).
- The gateway's offer: `client.info()` (`GatewayInfo`: voices, persona, version),
  `client.voices()` (`VoiceInfo`).
- Helpers: `chunk_array`, `read_wav_chunks`, `paced` / `apaced` (real-time pacing).
"""

from .async_client import AsyncConversation, AsyncConverseClient
from .events import (
    AudioFrame,
    BudgetMissed,
    Failover,
    FramesDropped,
    PersonaStarted,
    ReplyEvent,
    SessionEnded,
    SessionStarted,
    SessionSummary,
    TextPiece,
    TextPolicyApplied,
)
from .info import GatewayInfo, VoiceInfo
from .latency import LatencyStats
from .options import (
    FLOW_CONTROL,
    NO_RETRY,
    REAL_TIME,
    ClientConfigError,
    ConverseError,
    Persona,
    RetryPolicy,
    SessionOptions,
    TlsOptions,
)
from .result import ConverseResult
from .source import apaced, chunk_array, paced, read_wav_chunks
from .sync_client import Conversation, ConverseClient

__all__ = [
    "FLOW_CONTROL",
    "NO_RETRY",
    "REAL_TIME",
    "AsyncConversation",
    "AsyncConverseClient",
    "AudioFrame",
    "BudgetMissed",
    "ClientConfigError",
    "Conversation",
    "ConverseClient",
    "ConverseError",
    "ConverseResult",
    "Failover",
    "FramesDropped",
    "GatewayInfo",
    "LatencyStats",
    "Persona",
    "PersonaStarted",
    "ReplyEvent",
    "RetryPolicy",
    "SessionEnded",
    "SessionOptions",
    "SessionStarted",
    "SessionSummary",
    "TextPiece",
    "TextPolicyApplied",
    "TlsOptions",
    "VoiceInfo",
    "apaced",
    "chunk_array",
    "paced",
    "read_wav_chunks",
]
