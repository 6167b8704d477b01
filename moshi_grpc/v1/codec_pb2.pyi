from moshi_grpc.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CodecOpen(_message.Message):
    __slots__ = ("session_id", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PcmFrame(_message.Message):
    __slots__ = ("index", "pcm_f32le", "timing")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PCM_F32LE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    index: int
    pcm_f32le: bytes
    timing: _common_pb2.ServerTiming
    def __init__(self, index: _Optional[int] = ..., pcm_f32le: _Optional[bytes] = ..., timing: _Optional[_Union[_common_pb2.ServerTiming, _Mapping]] = ...) -> None: ...

class CodesFrame(_message.Message):
    __slots__ = ("index", "codes", "timing")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    index: int
    codes: _containers.RepeatedScalarFieldContainer[int]
    timing: _common_pb2.ServerTiming
    def __init__(self, index: _Optional[int] = ..., codes: _Optional[_Iterable[int]] = ..., timing: _Optional[_Union[_common_pb2.ServerTiming, _Mapping]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("open", "frame")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    open: CodecOpen
    frame: PcmFrame
    def __init__(self, open: _Optional[_Union[CodecOpen, _Mapping]] = ..., frame: _Optional[_Union[PcmFrame, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("open", "frame")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    open: CodecOpen
    frame: CodesFrame
    def __init__(self, open: _Optional[_Union[CodecOpen, _Mapping]] = ..., frame: _Optional[_Union[CodesFrame, _Mapping]] = ...) -> None: ...

class EncodeMuxEntry(_message.Message):
    __slots__ = ("session", "open", "frame", "close", "cancel")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    session: int
    open: CodecOpen
    frame: PcmFrame
    close: bool
    cancel: bool
    def __init__(self, session: _Optional[int] = ..., open: _Optional[_Union[CodecOpen, _Mapping]] = ..., frame: _Optional[_Union[PcmFrame, _Mapping]] = ..., close: _Optional[bool] = ..., cancel: _Optional[bool] = ...) -> None: ...

class EncodeMuxRequest(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[EncodeMuxEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[EncodeMuxEntry, _Mapping]]] = ...) -> None: ...

class EncodeMuxResult(_message.Message):
    __slots__ = ("session", "frame", "end")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    session: int
    frame: CodesFrame
    end: _common_pb2.MuxEnd
    def __init__(self, session: _Optional[int] = ..., frame: _Optional[_Union[CodesFrame, _Mapping]] = ..., end: _Optional[_Union[_common_pb2.MuxEnd, _Mapping]] = ...) -> None: ...

class EncodeMuxResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EncodeMuxResult]
    def __init__(self, results: _Optional[_Iterable[_Union[EncodeMuxResult, _Mapping]]] = ...) -> None: ...

class DecodeMuxEntry(_message.Message):
    __slots__ = ("session", "open", "frame", "close", "cancel")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    session: int
    open: CodecOpen
    frame: CodesFrame
    close: bool
    cancel: bool
    def __init__(self, session: _Optional[int] = ..., open: _Optional[_Union[CodecOpen, _Mapping]] = ..., frame: _Optional[_Union[CodesFrame, _Mapping]] = ..., close: _Optional[bool] = ..., cancel: _Optional[bool] = ...) -> None: ...

class DecodeMuxRequest(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[DecodeMuxEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[DecodeMuxEntry, _Mapping]]] = ...) -> None: ...

class DecodeMuxResult(_message.Message):
    __slots__ = ("session", "frame", "end")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    session: int
    frame: PcmFrame
    end: _common_pb2.MuxEnd
    def __init__(self, session: _Optional[int] = ..., frame: _Optional[_Union[PcmFrame, _Mapping]] = ..., end: _Optional[_Union[_common_pb2.MuxEnd, _Mapping]] = ...) -> None: ...

class DecodeMuxResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DecodeMuxResult]
    def __init__(self, results: _Optional[_Iterable[_Union[DecodeMuxResult, _Mapping]]] = ...) -> None: ...
