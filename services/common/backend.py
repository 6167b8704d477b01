"""Start a backend (codec or LM) server whose model loads after the port is open.

The health status stays NOT_SERVING (and new streams get UNAVAILABLE) until the model is
loaded, so a Kubernetes startupProbe / readiness probe sees the real state, and the
loading runs in a worker thread so health checks are answered meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from moshi_grpc import __version__
from moshi_grpc.services.common import flags, logs, tracing
from moshi_grpc.services.common.errors import NotReady
from moshi_grpc.services.common.metrics import new_registry
from moshi_grpc.services.common.mux import serve_mux, serve_stream
from moshi_grpc.services.common.server import (
    RunningServer,
    ServerConfig,
    ServerState,
    Service,
    start_server,
)

log = logging.getLogger(__name__)


def backend_info(engine: Any, model: Any, state: ServerState, **fields: Any) -> Any:
    """A replica's `Info` answer: what every backend reports (its model's identity, slots,
    version, draining), plus the service's own `fields`."""
    from moshi_grpc.v1 import common_pb2

    ident = model_identity(model, engine.options)
    return common_pb2.BackendInfo(
        model_name=engine.model_name,
        config_name=ident.config,
        dtype=ident.dtype,
        device=ident.device,
        slots_total=engine.options.max_sessions,
        version=__version__,
        draining=state.draining,
        **fields,
    )


class ModelServicer:
    """What a backend's servicer does the same way for the codec and the LM: it serves
    stages of an engine attached once the model is loaded (UNAVAILABLE before), per
    session or multiplexed."""

    what = "model"  # for the not-ready message
    grpc_service = ""  # the full gRPC service name (health, reflection)
    register: Callable[[Any, Any], None]  # the generated `add_*Servicer_to_server`
    metrics_type: Any  # `.create(registry)` builds the service's metrics

    def __init__(self, state: ServerState, idle_timeout_s: float, *, metrics: Any = None):
        self.state = state
        self.idle_timeout_s = idle_timeout_s
        self.metrics = metrics
        self.engine: Any = None

    def _engine(self) -> Any:
        if self.engine is None:
            raise NotReady(f"{self.what} is still loading; retry shortly")
        return self.engine

    async def _serve(self, stage: Any, requests: Any, context: Any):
        """A per-session stream of `stage` (`mux.serve_stream`)."""
        async for out in serve_stream(stage, requests, context, self.idle_timeout_s):
            yield out

    async def _serve_mux(self, stage: Any, response_type: type, requests: Any, context: Any):
        """A multiplexed stream of `stage` (`mux.serve_mux`)."""
        async for out in serve_mux(
            stage, response_type, self.state, requests, context, self.idle_timeout_s
        ):
            yield out


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


@dataclass(frozen=True)
class ModelIdentity:
    """What a replica runs, as build info and `Info` report it."""

    config: str
    device: str
    dtype: str  # without the "torch." prefix


def model_identity(model: Any, options: Any) -> ModelIdentity:
    """The model's own config name, device and dtype, else its options' (echo models have
    none)."""
    return ModelIdentity(
        config=str(getattr(model, "config_name", options.config)),
        device=str(getattr(model, "device", options.device)),
        dtype=str(getattr(model, "dtype", options.dtype)).replace("torch.", ""),
    )


@dataclass(frozen=True)
class BackendKind:
    """What differs between the codec and the LM server, said once per service (in its
    `startup.py`) so the shared start-up flow takes one description. The servicer class
    names its gRPC service, its generated registration and its metrics (`grpc_service`,
    `register`, `metrics_type`: class attributes of a `ModelServicer`)."""

    name: str  # "codec" / "lm": logs, metric labels, build info
    servicer_type: Any  # a ModelServicer subclass: `(state, idle_timeout_s, metrics=...)`
    model_of: Callable[[Any], Any]  # the engine's network, for build info
    load: Callable[[Any], Any]  # options -> the loaded model (the service's loader)
    build: Callable[[Any, Any, Any], Any]  # (loaded model, options, metrics) -> the engine


async def start_model_server(
    config: ServerConfig,
    options: Any,
    kind: BackendKind,
    *,
    load_model: Callable[[], Any] | None = None,
    wait_ready: bool = True,
) -> RunningServer:
    """Start a backend service (`start_codec_server` / `start_lm_server`): one per-server
    metrics registry, a servicer that answers UNAVAILABLE until the engine is attached, the
    model loaded (`kind.load(options)`, or `load_model()`: tests pass prebuilt models or a
    loader that blocks to observe NOT_SERVING while loading) and its engine built in a worker
    thread, then build info (`model_identity`) and SERVING. `running.servicer` is set; with
    `wait_ready=False` it returns while loading (await `running.ready`)."""
    registry = new_registry()
    servicer_type = kind.servicer_type
    metrics = servicer_type.metrics_type.create(registry)
    state = ServerState()
    servicer = servicer_type(state, config.idle_timeout_s, metrics=metrics)

    def attach(engine: Any, running: RunningServer) -> None:
        servicer.attach(engine)
        ident = model_identity(kind.model_of(engine), options)
        running.server_metrics.set_build_info(
            version=__version__,
            model=engine.model_name,
            config=ident.config,
            device=ident.device,
            dtype=ident.dtype,
        )

    register = servicer_type.register
    service = Service(servicer_type.grpc_service, lambda server: register(servicer, server))
    running = await start_backend(
        config,
        service,
        kind.name,
        load=lambda: kind.build(
            load_model() if load_model is not None else kind.load(options), options, metrics
        ),
        attach=attach,
        registry=registry,
        state=state,
        wait_ready=False,
    )
    running.servicer = servicer
    if wait_ready and running.ready is not None:
        await running.ready
    return running


# `start(config, options, wait_ready=False)`: a service's `start_*_server`.
StartServer = Callable[..., Awaitable[RunningServer]]


async def _serve_backend(
    args: argparse.Namespace,
    service_name: str,
    start: StartServer,
    options_from_args: Callable[[argparse.Namespace], Any],
) -> int:
    config = flags.server_config_from_args(args)
    running = await start(config, options_from_args(args), wait_ready=False)
    running.install_signal_handlers()
    log.info("%s listening on %s", service_name, running.address)
    try:
        await running.ready
    except Exception as exc:  # noqa: BLE001 - reported, exit code 1
        log.error("%s: could not load the model: %s", service_name, exc)
        return 1
    await running.wait_closed()
    return 0


class BackendCli:
    """A backend's subcommand (`codec`, `lm`): its flags (server, batching, model) and its
    `run`, from the service's name, its `options_from_args` and its start function (named
    "module:function", imported when the command runs: the service pulls in torch, and
    `--help` stays fast)."""

    def __init__(
        self, name: str, options_from_args: Callable[[argparse.Namespace], Any], start: str
    ) -> None:
        self.name = name
        self.options_from_args = options_from_args
        self._start = start

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        flags.add_server_flags(parser, self.name)
        flags.add_batching_flags(parser)
        flags.add_model_flags(parser, self.name)

    async def start(self, config: ServerConfig, options: Any, **kwargs: Any) -> RunningServer:
        import importlib

        module, _, function = self._start.partition(":")
        return await getattr(importlib.import_module(module), function)(config, options, **kwargs)

    def run(self, args: argparse.Namespace) -> int:
        return run_backend_cli(args, self.name, self.start, self.options_from_args)


def run_backend_cli(
    args: argparse.Namespace,
    service_name: str,
    start: StartServer,
    options_from_args: Callable[[argparse.Namespace], Any],
) -> int:
    """The `run(args)` of a backend subcommand (`codec`, `lm`): one flow for both, so
    their exit codes agree (0 clean stop, 1 model failed to load, 2 bad flags/weights).

    The port opens before the model loads (health says NOT_SERVING meanwhile)."""
    logs.install(json_logs=args.json_logs)
    try:
        if args.model == "real":
            flags.resolve_weights(args, service_name)
        if args.max_sessions < 1:
            raise ValueError(f"--max-sessions must be >= 1, got {args.max_sessions}")
        if args.idle_probe_s < 0:
            raise ValueError(f"--idle-probe-s must be >= 0 (0 = off), got {args.idle_probe_s}")
        tracing.setup_from_args(args, service_name)
        return asyncio.run(_serve_backend(args, service_name, start, options_from_args))
    except ValueError as exc:
        log.error("%s: %s", service_name, exc)
        return 2
    finally:
        tracing.shutdown()  # flushes the spans still batched
