"""Build and start a codec server in-process (used by the CLI, `moshi-grpc up` and tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moshi_grpc import __version__
from moshi_grpc.services.codec.engine import CodecEngine, CodecOptions, load_codec_model
from moshi_grpc.services.codec.servicer import SERVICE_NAME, CodecServicer
from moshi_grpc.services.common.backend import start_backend
from moshi_grpc.services.common.metrics import CodecMetrics, new_registry
from moshi_grpc.services.common.server import RunningServer, ServerConfig, ServerState, Service
from moshi_grpc.v1 import codec_pb2_grpc


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
    registry = new_registry()
    metrics = CodecMetrics.create(registry)
    state = ServerState()
    servicer = CodecServicer(state, config.idle_timeout_s, metrics=metrics)

    def load() -> CodecEngine:
        mimi = load_model() if load_model is not None else load_codec_model(options)
        return CodecEngine(mimi, options, metrics)

    def attach(engine: CodecEngine, running: RunningServer) -> None:
        servicer.attach(engine)
        mimi = engine.mimi
        running.server_metrics.set_build_info(
            version=__version__,
            model=engine.model_name,
            config=str(getattr(mimi, "config_name", options.config)),
            device=str(getattr(mimi, "device", options.device)),
            dtype=str(getattr(mimi, "dtype", options.dtype)).replace("torch.", ""),
        )

    service = Service(
        SERVICE_NAME, lambda server: codec_pb2_grpc.add_CodecServicer_to_server(servicer, server)
    )
    running = await start_backend(
        config,
        service,
        "codec",
        load=load,
        attach=attach,
        registry=registry,
        state=state,
        wait_ready=False,
    )
    running.servicer = servicer
    if wait_ready and running.ready is not None:
        await running.ready
    return running
