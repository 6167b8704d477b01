"""Codec servicer: proto <-> engine. Validates every message before it reaches a batch
(one bad frame must never fail the batched call of other streams).

Each of Encode and Decode is a `Stage` (services/common/mux.py) served two ways: per session
(`Encode`, `Decode`) and multiplexed (`EncodeMux`, `DecodeMux`), with the same validation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moshi_grpc.services.codec.engine import CodecEngine
from moshi_grpc.services.common.backend import ModelServicer, backend_info
from moshi_grpc.services.common.batching import BatchScheduler
from moshi_grpc.services.common.metrics import BatcherMetrics, CodecMetrics
from moshi_grpc.services.common.mux import Opened
from moshi_grpc.services.common.request_streams import stream_closer
from moshi_grpc.services.common.wire import (
    bucket_timings,
    parse_codes,
    parse_pcm,
    pcm_bytes,
    timing_proto,
)
from moshi_grpc.v1 import codec_pb2, codec_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "moshi_grpc.v1.Codec"


@dataclass(frozen=True)
class CodecStage:
    """One codec stage (encode or decode) of an attached engine: see `mux.Stage`.
    `parse` checks a frame message; `answer` builds the reply to one frame."""

    what: str
    scheduler: BatchScheduler
    metrics: BatcherMetrics | None
    parse: Callable[[Any], torch.Tensor]
    answer: Callable[[int, torch.Tensor, Any], Any]

    def open(self, opened: codec_pb2.CodecOpen) -> Opened:
        slot = self.scheduler.acquire(None, opened.session_id)
        return Opened(slot, stream_closer(slot, self.metrics))

    def respond(self, index: int, result: torch.Tensor, timing: Any) -> Any:
        return self.answer(index, result, timing_proto(timing))

    def answer_preamble(self, payload: Any, result: Any, timing: Any) -> None:
        """Codec streams have no preamble."""


class CodecServicer(ModelServicer, codec_pb2_grpc.CodecServicer):
    """Encode/Decode streams over an engine that is attached once the model is loaded."""

    what = "codec model"
    grpc_service = SERVICE_NAME
    register = staticmethod(codec_pb2_grpc.add_CodecServicer_to_server)
    metrics_type = CodecMetrics

    _stages: tuple[CodecStage, CodecStage] | None = None  # set by attach()

    def attach(self, engine: CodecEngine) -> None:
        mimi = engine.mimi
        frame_size = mimi.frame_size
        k, card = mimi.num_codebooks, mimi.cardinality

        def codes_out(index: int, codes: torch.Tensor, timing) -> codec_pb2.CodesFrame:
            return codec_pb2.CodesFrame(index=index, codes=codes.tolist(), timing=timing)

        def pcm_out(index: int, pcm: torch.Tensor, timing) -> codec_pb2.PcmFrame:
            return codec_pb2.PcmFrame(index=index, pcm_f32le=pcm_bytes(pcm), timing=timing)

        m = self.metrics
        encode = CodecStage(
            "Encode",
            engine.encoder,
            m.encode if m else None,
            lambda frame: parse_pcm(frame.pcm_f32le, frame_size),
            codes_out,
        )
        decode = CodecStage(
            "Decode",
            engine.decoder,
            m.decode if m else None,
            lambda frame: parse_codes(frame.codes, k, card, "codes"),
            pcm_out,
        )
        self._stages = (encode, decode)
        self.engine = engine

    def _stage(self, i: int) -> CodecStage:
        self._engine()
        return self._stages[i]

    async def Encode(self, request_iterator, context):
        async for out in self._serve(self._stage(0), request_iterator, context):
            yield out

    async def Decode(self, request_iterator, context):
        async for out in self._serve(self._stage(1), request_iterator, context):
            yield out

    async def EncodeMux(self, request_iterator, context):
        stage, response = self._stage(0), codec_pb2.EncodeMuxResponse
        async for out in self._serve_mux(stage, response, request_iterator, context):
            yield out

    async def DecodeMux(self, request_iterator, context):
        stage, response = self._stage(1), codec_pb2.DecodeMuxResponse
        async for out in self._serve_mux(stage, response, request_iterator, context):
            yield out

    async def Info(self, request, context) -> common_pb2.BackendInfo:
        """Slots are per stream kind: in use = the busier of encode and decode. Step times
        are per conversation frame: encode + decode batched-call percentiles; `buckets`
        gives each stage's step time per bucket (warm-up and recent medians)."""
        engine = self._engine()
        mimi = engine.mimi
        e50, e99 = engine.encoder.step_percentiles_ms()
        d50, d99 = engine.decoder.step_percentiles_ms()
        return backend_info(
            engine,
            mimi,
            self.state,
            slots_in_use=max(engine.encoder.slots_in_use, engine.decoder.slots_in_use),
            step_p50_ms=e50 + d50,
            step_p99_ms=e99 + d99,
            num_codebooks=mimi.num_codebooks,
            sample_rate=mimi.sample_rate,
            frame_size=mimi.frame_size,
            codebook_size=mimi.cardinality,
            text_vocab_size=0,
            buckets=bucket_timings(engine.encoder, "encode")
            + bucket_timings(engine.decoder, "decode"),
        )
