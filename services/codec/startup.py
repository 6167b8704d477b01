"""The codec service declared to the shared start-up flow (`services/common/backend.py`)."""

from __future__ import annotations

from typing import Any

from moshi_grpc.services.codec.engine import CodecEngine, CodecOptions, load_codec_model
from moshi_grpc.services.codec.servicer import CodecServicer
from moshi_grpc.services.common.backend import BackendKind, start_model_server
from moshi_grpc.services.common.server import RunningServer, ServerConfig

KIND = BackendKind(
    "codec", CodecServicer, lambda engine: engine.mimi, load_codec_model, CodecEngine
)


async def start_codec_server(
    config: ServerConfig, options: CodecOptions, **kwargs: Any
) -> RunningServer:
    """Start the codec service in-process (the CLI, `moshi-grpc up`, tests); keyword
    arguments as `start_model_server`'s (`load_model`: a prebuilt Mimi, `wait_ready`)."""
    return await start_model_server(config, options, KIND, **kwargs)
