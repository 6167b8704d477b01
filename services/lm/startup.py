"""Build and start an LM server in-process (used by the CLI, `moshi-grpc up` and tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moshi_grpc.services.common.backend import BackendKind, start_model_server
from moshi_grpc.services.common.metrics import LmMetrics
from moshi_grpc.services.common.server import RunningServer, ServerConfig
from moshi_grpc.services.lm.engine import LmEngine, LmOptions, load_lm_model
from moshi_grpc.services.lm.servicer import SERVICE_NAME, LmServicer
from moshi_grpc.v1 import lm_pb2_grpc

KIND = BackendKind(
    name="lm",
    grpc_service=SERVICE_NAME,
    metrics_type=LmMetrics,
    servicer_type=LmServicer,
    register=lm_pb2_grpc.add_LMServicer_to_server,
    model_of=lambda engine: engine.lm,
)


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

    def make_engine(metrics: LmMetrics) -> LmEngine:
        lm, tokenizer = load_model() if load_model is not None else load_lm_model(options)
        return LmEngine(lm, tokenizer, options, metrics)

    return await start_model_server(config, options, KIND, make_engine, wait_ready=wait_ready)
