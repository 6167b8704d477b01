from moshi_grpc.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CodecOpen(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

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
