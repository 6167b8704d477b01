from moshi_grpc.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_PCM16: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_FLOAT32: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_MULAW: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_ALAW: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_OGG_OPUS: _ClassVar[AudioEncoding]

class InputPacing(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_PACING_UNSPECIFIED: _ClassVar[InputPacing]
    INPUT_PACING_REAL_TIME: _ClassVar[InputPacing]
    INPUT_PACING_FLOW_CONTROL: _ClassVar[InputPacing]
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
AUDIO_ENCODING_PCM16: AudioEncoding
AUDIO_ENCODING_FLOAT32: AudioEncoding
AUDIO_ENCODING_MULAW: AudioEncoding
AUDIO_ENCODING_ALAW: AudioEncoding
AUDIO_ENCODING_OGG_OPUS: AudioEncoding
INPUT_PACING_UNSPECIFIED: InputPacing
INPUT_PACING_REAL_TIME: InputPacing
INPUT_PACING_FLOW_CONTROL: InputPacing

class SessionConfig(_message.Message):
    __slots__ = ("sample_rate", "encoding", "sampling", "seed", "budget_ms", "max_consecutive_misses", "client_id", "input_pacing", "persona")
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONSECUTIVE_MISSES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_PACING_FIELD_NUMBER: _ClassVar[int]
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    sample_rate: int
    encoding: AudioEncoding
    sampling: _common_pb2.SamplingParams
    seed: int
    budget_ms: int
    max_consecutive_misses: int
    client_id: str
    input_pacing: InputPacing
    persona: Persona
    def __init__(self, sample_rate: _Optional[int] = ..., encoding: _Optional[_Union[AudioEncoding, str]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., budget_ms: _Optional[int] = ..., max_consecutive_misses: _Optional[int] = ..., client_id: _Optional[str] = ..., input_pacing: _Optional[_Union[InputPacing, str]] = ..., persona: _Optional[_Union[Persona, _Mapping]] = ...) -> None: ...

class Persona(_message.Message):
    __slots__ = ("voice_id", "voice_audio", "prompt")
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    VOICE_AUDIO_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    voice_id: str
    voice_audio: VoiceAudio
    prompt: str
    def __init__(self, voice_id: _Optional[str] = ..., voice_audio: _Optional[_Union[VoiceAudio, _Mapping]] = ..., prompt: _Optional[str] = ...) -> None: ...

class VoiceAudio(_message.Message):
    __slots__ = ("data", "encoding", "sample_rate")
    DATA_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    encoding: AudioEncoding
    sample_rate: int
    def __init__(self, data: _Optional[bytes] = ..., encoding: _Optional[_Union[AudioEncoding, str]] = ..., sample_rate: _Optional[int] = ...) -> None: ...

class GatewayInfo(_message.Message):
    __slots__ = ("voices", "persona", "version")
    VOICES_FIELD_NUMBER: _ClassVar[int]
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    voices: _containers.RepeatedCompositeFieldContainer[VoiceInfo]
    persona: bool
    version: str
    def __init__(self, voices: _Optional[_Iterable[_Union[VoiceInfo, _Mapping]]] = ..., persona: _Optional[bool] = ..., version: _Optional[str] = ...) -> None: ...

class VoiceInfo(_message.Message):
    __slots__ = ("voice_id", "duration_s", "frames")
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    voice_id: str
    duration_s: float
    frames: int
    def __init__(self, voice_id: _Optional[str] = ..., duration_s: _Optional[float] = ..., frames: _Optional[int] = ...) -> None: ...

class AudioChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ConverseRequest(_message.Message):
    __slots__ = ("config", "audio")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    config: SessionConfig
    audio: AudioChunk
    def __init__(self, config: _Optional[_Union[SessionConfig, _Mapping]] = ..., audio: _Optional[_Union[AudioChunk, _Mapping]] = ...) -> None: ...

class AudioOut(_message.Message):
    __slots__ = ("frame_index", "data", "silence")
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SILENCE_FIELD_NUMBER: _ClassVar[int]
    frame_index: int
    data: bytes
    silence: bool
    def __init__(self, frame_index: _Optional[int] = ..., data: _Optional[bytes] = ..., silence: _Optional[bool] = ...) -> None: ...

class TextPiece(_message.Message):
    __slots__ = ("frame_index", "text")
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    frame_index: int
    text: str
    def __init__(self, frame_index: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class SessionStarted(_message.Message):
    __slots__ = ("session_id", "codec_replica", "lm_replica", "budget_ms", "max_consecutive_misses", "sample_rate", "model", "input_pacing", "persona")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CODEC_REPLICA_FIELD_NUMBER: _ClassVar[int]
    LM_REPLICA_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONSECUTIVE_MISSES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_PACING_FIELD_NUMBER: _ClassVar[int]
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    codec_replica: str
    lm_replica: str
    budget_ms: int
    max_consecutive_misses: int
    sample_rate: int
    model: str
    input_pacing: InputPacing
    persona: PersonaStarted
    def __init__(self, session_id: _Optional[str] = ..., codec_replica: _Optional[str] = ..., lm_replica: _Optional[str] = ..., budget_ms: _Optional[int] = ..., max_consecutive_misses: _Optional[int] = ..., sample_rate: _Optional[int] = ..., model: _Optional[str] = ..., input_pacing: _Optional[_Union[InputPacing, str]] = ..., persona: _Optional[_Union[PersonaStarted, _Mapping]] = ...) -> None: ...

class PersonaStarted(_message.Message):
    __slots__ = ("voice_id", "voice_frames", "prompt_frames", "cached", "voice_encode_ms", "prompt_ready_ms")
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    VOICE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    VOICE_ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_READY_MS_FIELD_NUMBER: _ClassVar[int]
    voice_id: str
    voice_frames: int
    prompt_frames: int
    cached: bool
    voice_encode_ms: float
    prompt_ready_ms: float
    def __init__(self, voice_id: _Optional[str] = ..., voice_frames: _Optional[int] = ..., prompt_frames: _Optional[int] = ..., cached: _Optional[bool] = ..., voice_encode_ms: _Optional[float] = ..., prompt_ready_ms: _Optional[float] = ...) -> None: ...

class BudgetMissed(_message.Message):
    __slots__ = ("frame_index", "late_ms", "consecutive")
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    LATE_MS_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FIELD_NUMBER: _ClassVar[int]
    frame_index: int
    late_ms: float
    consecutive: int
    def __init__(self, frame_index: _Optional[int] = ..., late_ms: _Optional[float] = ..., consecutive: _Optional[int] = ...) -> None: ...

class FramesDropped(_message.Message):
    __slots__ = ("first_frame_index", "count", "reason")
    FIRST_FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    first_frame_index: int
    count: int
    reason: str
    def __init__(self, first_frame_index: _Optional[int] = ..., count: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Failover(_message.Message):
    __slots__ = ("from_replica", "to_replica", "frames_lost")
    FROM_REPLICA_FIELD_NUMBER: _ClassVar[int]
    TO_REPLICA_FIELD_NUMBER: _ClassVar[int]
    FRAMES_LOST_FIELD_NUMBER: _ClassVar[int]
    from_replica: str
    to_replica: str
    frames_lost: int
    def __init__(self, from_replica: _Optional[str] = ..., to_replica: _Optional[str] = ..., frames_lost: _Optional[int] = ...) -> None: ...

class SessionSummary(_message.Message):
    __slots__ = ("frames_in", "frames_out", "frames_late", "frames_dropped", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "duration_s", "reason", "latency_frames", "frames_dropped_stalled")
    FRAMES_IN_FIELD_NUMBER: _ClassVar[int]
    FRAMES_OUT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_LATE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P95_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_STALLED_FIELD_NUMBER: _ClassVar[int]
    frames_in: int
    frames_out: int
    frames_late: int
    frames_dropped: int
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    duration_s: float
    reason: str
    latency_frames: int
    frames_dropped_stalled: int
    def __init__(self, frames_in: _Optional[int] = ..., frames_out: _Optional[int] = ..., frames_late: _Optional[int] = ..., frames_dropped: _Optional[int] = ..., latency_p50_ms: _Optional[float] = ..., latency_p95_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., duration_s: _Optional[float] = ..., reason: _Optional[str] = ..., latency_frames: _Optional[int] = ..., frames_dropped_stalled: _Optional[int] = ...) -> None: ...

class SessionEnded(_message.Message):
    __slots__ = ("summary",)
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    summary: SessionSummary
    def __init__(self, summary: _Optional[_Union[SessionSummary, _Mapping]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("started", "budget_missed", "frames_dropped", "failover", "ended", "text_policy")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MISSED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    FAILOVER_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    TEXT_POLICY_FIELD_NUMBER: _ClassVar[int]
    started: SessionStarted
    budget_missed: BudgetMissed
    frames_dropped: FramesDropped
    failover: Failover
    ended: SessionEnded
    text_policy: TextPolicyApplied
    def __init__(self, started: _Optional[_Union[SessionStarted, _Mapping]] = ..., budget_missed: _Optional[_Union[BudgetMissed, _Mapping]] = ..., frames_dropped: _Optional[_Union[FramesDropped, _Mapping]] = ..., failover: _Optional[_Union[Failover, _Mapping]] = ..., ended: _Optional[_Union[SessionEnded, _Mapping]] = ..., text_policy: _Optional[_Union[TextPolicyApplied, _Mapping]] = ...) -> None: ...

class TextPolicyApplied(_message.Message):
    __slots__ = ("frame_index", "action", "rule", "mute_frames")
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    MUTE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    frame_index: int
    action: str
    rule: str
    mute_frames: int
    def __init__(self, frame_index: _Optional[int] = ..., action: _Optional[str] = ..., rule: _Optional[str] = ..., mute_frames: _Optional[int] = ...) -> None: ...

class ConverseResponse(_message.Message):
    __slots__ = ("audio", "text", "event")
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    audio: AudioOut
    text: TextPiece
    event: Event
    def __init__(self, audio: _Optional[_Union[AudioOut, _Mapping]] = ..., text: _Optional[_Union[TextPiece, _Mapping]] = ..., event: _Optional[_Union[Event, _Mapping]] = ...) -> None: ...
