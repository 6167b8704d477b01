from moshi_grpc.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplayStep(_message.Message):
    __slots__ = ("user_codes", "text_token", "moshi_codes")
    USER_CODES_FIELD_NUMBER: _ClassVar[int]
    TEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MOSHI_CODES_FIELD_NUMBER: _ClassVar[int]
    user_codes: _containers.RepeatedScalarFieldContainer[int]
    text_token: int
    moshi_codes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, user_codes: _Optional[_Iterable[int]] = ..., text_token: _Optional[int] = ..., moshi_codes: _Optional[_Iterable[int]] = ...) -> None: ...

class LmOpen(_message.Message):
    __slots__ = ("session_id", "sampling", "seed", "replay", "trace_context", "persona")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    sampling: _common_pb2.SamplingParams
    seed: int
    replay: _containers.RepeatedCompositeFieldContainer[ReplayStep]
    trace_context: _containers.ScalarMap[str, str]
    persona: PersonaPrompt
    def __init__(self, session_id: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., replay: _Optional[_Iterable[_Union[ReplayStep, _Mapping]]] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., persona: _Optional[_Union[PersonaPrompt, _Mapping]] = ...) -> None: ...

class PersonaPrompt(_message.Message):
    __slots__ = ("voice_codes", "text")
    VOICE_CODES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    voice_codes: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, voice_codes: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class PromptReady(_message.Message):
    __slots__ = ("prefix_frames", "cached", "cached_frames", "ready_ms")
    PREFIX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    CACHED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    READY_MS_FIELD_NUMBER: _ClassVar[int]
    prefix_frames: int
    cached: bool
    cached_frames: int
    ready_ms: float
    def __init__(self, prefix_frames: _Optional[int] = ..., cached: _Optional[bool] = ..., cached_frames: _Optional[int] = ..., ready_ms: _Optional[float] = ...) -> None: ...

class UserCodes(_message.Message):
    __slots__ = ("index", "codes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    index: int
    codes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, index: _Optional[int] = ..., codes: _Optional[_Iterable[int]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("open", "frame")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    open: LmOpen
    frame: UserCodes
    def __init__(self, open: _Optional[_Union[LmOpen, _Mapping]] = ..., frame: _Optional[_Union[UserCodes, _Mapping]] = ...) -> None: ...

class StepOutput(_message.Message):
    __slots__ = ("index", "ready", "text_token", "text_piece", "moshi_codes", "timing", "prompt")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    TEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TEXT_PIECE_FIELD_NUMBER: _ClassVar[int]
    MOSHI_CODES_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    index: int
    ready: bool
    text_token: int
    text_piece: str
    moshi_codes: _containers.RepeatedScalarFieldContainer[int]
    timing: _common_pb2.ServerTiming
    prompt: PromptReady
    def __init__(self, index: _Optional[int] = ..., ready: _Optional[bool] = ..., text_token: _Optional[int] = ..., text_piece: _Optional[str] = ..., moshi_codes: _Optional[_Iterable[int]] = ..., timing: _Optional[_Union[_common_pb2.ServerTiming, _Mapping]] = ..., prompt: _Optional[_Union[PromptReady, _Mapping]] = ...) -> None: ...

class StepMuxEntry(_message.Message):
    __slots__ = ("session", "open", "frame", "close", "cancel")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    session: int
    open: LmOpen
    frame: UserCodes
    close: bool
    cancel: bool
    def __init__(self, session: _Optional[int] = ..., open: _Optional[_Union[LmOpen, _Mapping]] = ..., frame: _Optional[_Union[UserCodes, _Mapping]] = ..., close: _Optional[bool] = ..., cancel: _Optional[bool] = ...) -> None: ...

class StepMuxRequest(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[StepMuxEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[StepMuxEntry, _Mapping]]] = ...) -> None: ...

class StepMuxResult(_message.Message):
    __slots__ = ("session", "frame", "end")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    session: int
    frame: StepOutput
    end: _common_pb2.MuxEnd
    def __init__(self, session: _Optional[int] = ..., frame: _Optional[_Union[StepOutput, _Mapping]] = ..., end: _Optional[_Union[_common_pb2.MuxEnd, _Mapping]] = ...) -> None: ...

class StepMuxResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[StepMuxResult]
    def __init__(self, results: _Optional[_Iterable[_Union[StepMuxResult, _Mapping]]] = ...) -> None: ...
