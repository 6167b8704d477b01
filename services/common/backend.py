"""Start a backend (codec or LM) server whose model loads after the port is open.

The health status stays NOT_SERVING (and new streams get UNAVAILABLE) until the model is
loaded, so a Kubernetes startupProbe / readiness probe sees the real state, and the
loading runs in a worker thread so health checks are answered meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from moshi_grpc.services.common.server import (
    RunningServer,
    ServerConfig,
    ServerState,
    Service,
    start_server,
)

log = logging.getLogger(__name__)


async def start_backend(
    config: ServerConfig,
    service: Service,
    service_name: str,
    *,
    load: Callable[[], Any],
    attach: Callable[[Any, RunningServer], None],
    registry: CollectorRegistry,
    state: ServerState,
    wait_ready: bool = True,
) -> RunningServer:
    """Open the port (NOT_SERVING), run `load()` in a thread, `attach(engine)` on the loop,
    then SERVING. `attach(engine, running)` wires the engine into the servicer. `load` returns an engine with `start()` and `close()`.

    With `wait_ready=False` this returns at once; `running.ready` (a task) completes when
    the model is loaded (or raises what loading raised, after stopping the server).
    """
    running = await start_server(
        config, [service], service_name, registry=registry, state=state, ready=False
    )
    engine_box: list[Any] = []

    def close_engine() -> None:
        for engine in engine_box:
            engine.close()

    running.on_stop(close_engine)

    async def load_and_serve() -> None:
        t0 = time.perf_counter()
        try:
            engine = await asyncio.get_running_loop().run_in_executor(None, load)
        except BaseException:
            log.exception("%s: model loading failed", service_name)
            await running.stop(0)
            raise
        if running.state.draining:
            engine.close()
            return
        engine.start()
        engine_box.append(engine)
        attach(engine, running)
        seconds = time.perf_counter() - t0
        running.server_metrics.model_load_seconds.labels(service_name).set(seconds)
        log.info("%s: model loaded in %.2fs", service_name, seconds)
        await running.set_serving(True)

    running.ready = asyncio.ensure_future(load_and_serve())
    if wait_ready:
        await running.ready
    return running
