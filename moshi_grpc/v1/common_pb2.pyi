from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("text_temperature", "text_top_k", "audio_temperature", "audio_top_k")
    TEXT_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TEXT_TOP_K_FIELD_NUMBER: _ClassVar[int]
    AUDIO_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_TOP_K_FIELD_NUMBER: _ClassVar[int]
    text_temperature: float
    text_top_k: int
    audio_temperature: float
    audio_top_k: int
    def __init__(self, text_temperature: _Optional[float] = ..., text_top_k: _Optional[int] = ..., audio_temperature: _Optional[float] = ..., audio_top_k: _Optional[int] = ...) -> None: ...

class ServerTiming(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "batch_size")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    batch_size: int
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BackendInfo(_message.Message):
    __slots__ = ("model_name", "config_name", "dtype", "device", "slots_total", "slots_in_use", "step_p50_ms", "step_p99_ms", "version", "draining", "num_codebooks", "sample_rate", "frame_size", "codebook_size", "text_vocab_size", "buckets", "persona", "prefix_cache")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_IN_USE_FIELD_NUMBER: _ClassVar[int]
    STEP_P50_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_P99_MS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    NUM_CODEBOOKS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    FRAME_SIZE_FIELD_NUMBER: _ClassVar[int]
    CODEBOOK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TEXT_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    config_name: str
    dtype: str
    device: str
    slots_total: int
    slots_in_use: int
    step_p50_ms: float
    step_p99_ms: float
    version: str
    draining: bool
    num_codebooks: int
    sample_rate: int
    frame_size: int
    codebook_size: int
    text_vocab_size: int
    buckets: _containers.RepeatedCompositeFieldContainer[BucketTiming]
    persona: bool
    prefix_cache: PrefixCacheInfo
    def __init__(self, model_name: _Optional[str] = ..., config_name: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., slots_total: _Optional[int] = ..., slots_in_use: _Optional[int] = ..., step_p50_ms: _Optional[float] = ..., step_p99_ms: _Optional[float] = ..., version: _Optional[str] = ..., draining: _Optional[bool] = ..., num_codebooks: _Optional[int] = ..., sample_rate: _Optional[int] = ..., frame_size: _Optional[int] = ..., codebook_size: _Optional[int] = ..., text_vocab_size: _Optional[int] = ..., buckets: _Optional[_Iterable[_Union[BucketTiming, _Mapping]]] = ..., persona: _Optional[bool] = ..., prefix_cache: _Optional[_Union[PrefixCacheInfo, _Mapping]] = ...) -> None: ...

class PrefixCacheInfo(_message.Message):
    __slots__ = ("entries", "bytes", "capacity_bytes", "hits", "voice_hits", "misses", "evictions")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    VOICE_HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    entries: int
    bytes: int
    capacity_bytes: int
    hits: int
    voice_hits: int
    misses: int
    evictions: int
    def __init__(self, entries: _Optional[int] = ..., bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., hits: _Optional[int] = ..., voice_hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...

class BucketTiming(_message.Message):
    __slots__ = ("batch_size", "stage", "warm_ms", "recent_p50_ms", "recent_count")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    WARM_MS_FIELD_NUMBER: _ClassVar[int]
    RECENT_P50_MS_FIELD_NUMBER: _ClassVar[int]
    RECENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    stage: str
    warm_ms: float
    recent_p50_ms: float
    recent_count: int
    def __init__(self, batch_size: _Optional[int] = ..., stage: _Optional[str] = ..., warm_ms: _Optional[float] = ..., recent_p50_ms: _Optional[float] = ..., recent_count: _Optional[int] = ...) -> None: ...

class MuxEnd(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
