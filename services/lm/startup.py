"""The LM service declared to the shared start-up flow (`services/common/backend.py`)."""

from __future__ import annotations

from typing import Any

from moshi_grpc.services.common.backend import BackendKind, start_model_server
from moshi_grpc.services.common.metrics import LmMetrics
from moshi_grpc.services.common.server import RunningServer, ServerConfig
from moshi_grpc.services.lm.engine import LmEngine, LmOptions, load_lm_model
from moshi_grpc.services.lm.servicer import LmServicer


def _engine(loaded: tuple[Any, Any], options: LmOptions, metrics: LmMetrics) -> LmEngine:
    lm, tokenizer = loaded
    return LmEngine(lm, tokenizer, options, metrics)


KIND = BackendKind("lm", LmServicer, lambda engine: engine.lm, load_lm_model, _engine)


async def start_lm_server(config: ServerConfig, options: LmOptions, **kwargs: Any) -> RunningServer:
    """Start the LM service in-process (the CLI, `moshi-grpc up`, tests); keyword arguments
    as `start_model_server`'s (`load_model`: a prebuilt (lm, tokenizer), `wait_ready`)."""
    return await start_model_server(config, options, KIND, **kwargs)
