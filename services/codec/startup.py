"""Build and start a codec server in-process (used by the CLI, `moshi-grpc up` and tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moshi_grpc.services.codec.engine import CodecEngine, CodecOptions, load_codec_model
from moshi_grpc.services.codec.servicer import SERVICE_NAME, CodecServicer
from moshi_grpc.services.common.backend import BackendKind, start_model_server
from moshi_grpc.services.common.metrics import CodecMetrics
from moshi_grpc.services.common.server import RunningServer, ServerConfig
from moshi_grpc.v1 import codec_pb2_grpc

KIND = BackendKind(
    name="codec",
    grpc_service=SERVICE_NAME,
    metrics_type=CodecMetrics,
    servicer_type=CodecServicer,
    register=codec_pb2_grpc.add_CodecServicer_to_server,
    model_of=lambda engine: engine.mimi,
)


async def start_codec_server(
    config: ServerConfig,
    options: CodecOptions,
    *,
    load_model: Callable[[], Any] | None = None,
    wait_ready: bool = True,
) -> RunningServer:
    """Start the codec service; `running.servicer.engine` is the engine once loaded.

    `load_model` overrides how the Mimi model is built (tests pass a prebuilt model, or a
    loader that blocks to observe NOT_SERVING while loading). With `wait_ready=False` it
    returns while loading; await `running.ready` for the model."""

    def make_engine(metrics: CodecMetrics) -> CodecEngine:
        mimi = load_model() if load_model is not None else load_codec_model(options)
        return CodecEngine(mimi, options, metrics)

    return await start_model_server(config, options, KIND, make_engine, wait_ready=wait_ready)
