"""Codec servicer: proto <-> engine. Validates every message before it reaches a batch
(one bad frame must never fail the batched call of other streams)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import torch

from moshi_grpc import __version__
from moshi_grpc.services.codec.engine import CodecEngine
from moshi_grpc.services.common import logs
from moshi_grpc.services.common.batching import BatchScheduler
from moshi_grpc.services.common.errors import NotReady
from moshi_grpc.services.common.metrics import BatcherMetrics
from moshi_grpc.services.common.server import ServerState
from moshi_grpc.services.common.streams import (
    expect_frame,
    next_message,
    read_open,
    stream_closer,
)
from moshi_grpc.services.common.wire import parse_codes, parse_pcm, pcm_bytes
from moshi_grpc.v1 import codec_pb2, codec_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "moshi_grpc.v1.Codec"


class CodecServicer(codec_pb2_grpc.CodecServicer):
    """Encode/Decode streams over an engine that is attached once the model is loaded."""

    def __init__(
        self, state: ServerState, idle_timeout_s: float, *, metrics: Any | None = None
    ) -> None:
        self.state = state
        self.idle_timeout_s = idle_timeout_s
        self.metrics = metrics
        self.engine: CodecEngine | None = None

    def attach(self, engine: CodecEngine) -> None:
        self.engine = engine

    def _engine(self) -> CodecEngine:
        if self.engine is None:
            raise NotReady("codec model is still loading; retry shortly")
        return self.engine

    async def _stream(
        self,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        what: str,
        scheduler: BatchScheduler,
        metrics: BatcherMetrics | None,
        parse: Callable[[Any], torch.Tensor],
        respond: Callable[[int, torch.Tensor, common_pb2.ServerTiming], Any],
    ):
        opened = await read_open(requests, self.idle_timeout_s, what)
        if opened is None:
            return
        logs.bind_session(opened.session_id)
        slot = scheduler.acquire(None, opened.session_id)
        close = stream_closer(slot, metrics)
        context.add_done_callback(lambda _ctx: close())
        log.info("%s stream opened (slot %d)", what, slot.slot)
        index = 0
        try:
            while True:
                message = await next_message(requests, self.idle_timeout_s)
                if message is None:
                    break
                frame = expect_frame(message, index, what)
                payload = parse(frame)
                result, timing = await slot.submit(payload)
                yield respond(frame.index, result, timing.to_proto())
                index += 1
        finally:
            close()
            log.info("%s stream closed after %d frame(s)", what, index)

    async def Encode(self, request_iterator, context):
        engine = self._engine()
        mimi = engine.mimi
        frame_size = mimi.frame_size

        def respond(index: int, codes: torch.Tensor, timing) -> codec_pb2.CodesFrame:
            return codec_pb2.CodesFrame(index=index, codes=codes.tolist(), timing=timing)

        async for out in self._stream(
            request_iterator,
            context,
            "Encode",
            engine.encoder,
            self.metrics.encode if self.metrics else None,
            lambda frame: parse_pcm(frame.pcm_f32le, frame_size),
            respond,
        ):
            yield out

    async def Decode(self, request_iterator, context):
        engine = self._engine()
        mimi = engine.mimi
        k, card = mimi.num_codebooks, mimi.cardinality

        def respond(index: int, pcm: torch.Tensor, timing) -> codec_pb2.PcmFrame:
            return codec_pb2.PcmFrame(index=index, pcm_f32le=pcm_bytes(pcm), timing=timing)

        async for out in self._stream(
            request_iterator,
            context,
            "Decode",
            engine.decoder,
            self.metrics.decode if self.metrics else None,
            lambda frame: parse_codes(frame.codes, k, card, "codes"),
            respond,
        ):
            yield out

    async def Info(self, request, context) -> common_pb2.BackendInfo:
        """Slots are per stream kind: in use = the busier of encode and decode. Step times
        are per conversation frame: encode + decode batched-call percentiles."""
        engine = self._engine()
        mimi = engine.mimi
        e50, e99 = engine.encoder.step_percentiles_ms()
        d50, d99 = engine.decoder.step_percentiles_ms()
        return common_pb2.BackendInfo(
            model_name=engine.model_name,
            config_name=str(getattr(mimi, "config_name", engine.options.config)),
            dtype=str(getattr(mimi, "dtype", engine.options.dtype)).replace("torch.", ""),
            device=str(getattr(mimi, "device", engine.options.device)),
            slots_total=engine.options.max_sessions,
            slots_in_use=max(engine.encoder.slots_in_use, engine.decoder.slots_in_use),
            step_p50_ms=e50 + d50,
            step_p99_ms=e99 + d99,
            version=__version__,
            draining=self.state.draining,
            num_codebooks=mimi.num_codebooks,
            sample_rate=mimi.sample_rate,
            frame_size=mimi.frame_size,
            codebook_size=mimi.cardinality,
            text_vocab_size=0,
        )
