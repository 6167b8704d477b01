"""Build and start an LM server in-process (used by the CLI, `moshi-grpc up` and tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moshi_grpc import __version__
from moshi_grpc.services.common.backend import start_backend
from moshi_grpc.services.common.metrics import LmMetrics, new_registry
from moshi_grpc.services.common.server import RunningServer, ServerConfig, ServerState, Service
from moshi_grpc.services.lm.engine import LmEngine, LmOptions, load_lm_model
from moshi_grpc.services.lm.servicer import SERVICE_NAME, LmServicer
from moshi_grpc.v1 import lm_pb2_grpc


async def start_lm_server(
    config: ServerConfig,
    options: LmOptions,
    *,
    load_model: Callable[[], tuple[Any, Any]] | None = None,
    wait_ready: bool = True,
) -> RunningServer:
    """Start the LM service; `running.servicer.engine` is the engine once loaded.

    `load_model` overrides how (lm, tokenizer) are built (tests pass prebuilt ones, or a
    loader that blocks to observe NOT_SERVING while loading). With `wait_ready=False` it
    returns while loading; await `running.ready` for the model."""
    registry = new_registry()
    metrics = LmMetrics.create(registry)
    state = ServerState()
    servicer = LmServicer(state, config.idle_timeout_s, metrics=metrics)

    def load() -> LmEngine:
        lm, tokenizer = load_model() if load_model is not None else load_lm_model(options)
        return LmEngine(lm, tokenizer, options, metrics)

    def attach(engine: LmEngine, running: RunningServer) -> None:
        servicer.attach(engine)
        lm = engine.lm
        running.server_metrics.set_build_info(
            version=__version__,
            model=engine.model_name,
            config=str(getattr(lm, "config_name", options.config)),
            device=str(getattr(lm, "device", options.device)),
            dtype=str(getattr(lm, "dtype", options.dtype)).replace("torch.", ""),
        )

    service = Service(
        SERVICE_NAME, lambda server: lm_pb2_grpc.add_LMServicer_to_server(servicer, server)
    )
    running = await start_backend(
        config,
        service,
        "lm",
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
