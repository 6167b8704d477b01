"""OpenTelemetry tracing: one trace per conversation, across gateway, codec and LM.

Off by default; `--otel-endpoint` turns it on (the optional `[otel]` extra: OTLP/gRPC
export through a batching span processor). Spans are per session and per backend stream,
never per frame: a traced conversation costs the same handful of spans however long it runs,
and with tracing off every hook is one check per session and nothing from opentelemetry is
imported.

Spans (service.name is the service that records them):

- gateway `gateway.session` (SERVER): one per Converse stream, a child of the client's own
  trace when its call carries `traceparent` metadata. Attributes: `moshi.session_id`,
  `moshi.encoding`, `moshi.sample_rate`, `moshi.budget_ms`, `moshi.codec_replica`,
  `moshi.lm_replica`, `moshi.outcome` (the summary's reason), `moshi.frames_in`,
  `moshi.frames_out`, `moshi.frames_late`, `moshi.frames_dropped`, `moshi.failovers`,
  `rpc.grpc.status_code`.
- gateway `gateway.encode` / `gateway.decode` / `gateway.step` (CLIENT): one per backend
  stream of the session, children of `gateway.session` (an LM failover opens another
  `gateway.step`). Attributes: `moshi.replica`, `moshi.backend_streams` (mux/per-session).
- codec `codec.encode` / `codec.decode`, lm `lm.step` (SERVER): one per backend session (a
  per-session stream, or one session of a multiplexed stream), children of the gateway's
  stream span. Attributes: `moshi.session_id`, `moshi.mux`, `moshi.replay_steps` (lm).

Propagation is W3C trace context. A per-session backend stream carries `traceparent` (and
`tracestate`) as gRPC metadata. A multiplexed stream carries many sessions, so its metadata
cannot say whose trace it is: each session's `open` carries the context instead
(`CodecOpen.trace_context`, `LmOpen.trace_context`). A backend reads the open's field first,
then the stream's metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc

from moshi_grpc import __version__

log = logging.getLogger(__name__)

OTEL_HINT = "install it with: pip install 'moshi-grpc[otel]'"
# What each backend stage's spans are named and which service records them.
_BACKEND_SPANS = {
    "Encode": ("codec", "codec.encode"),
    "Decode": ("codec", "codec.decode"),
    "Step": ("lm", "lm.step"),
}
_CONTEXT_KEYS = ("traceparent", "tracestate")


class TracingUnavailable(ValueError):
    """`--otel-endpoint` was given but the `[otel]` extra is not installed."""


class _Tracing:
    """The installed tracing: one tracer provider per service name (in production a process
    is one service; tests run all three in one process), each with its own span processor."""

    def __init__(self, make_processor: Callable[[], Any]) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._make_processor = make_processor
        self._providers: dict[str, Any] = {}
        self._tracers: dict[str, Any] = {}
        self.propagator = TraceContextTextMapPropagator()

    def tracer(self, service: str) -> Any:
        tracer = self._tracers.get(service)
        if tracer is None:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider

            resource = Resource.create({"service.name": service, "service.version": __version__})
            provider = TracerProvider(resource=resource, shutdown_on_exit=False)
            provider.add_span_processor(self._make_processor())
            self._providers[service] = provider
            tracer = self._tracers[service] = provider.get_tracer("moshi_grpc", __version__)
        return tracer

    def shutdown(self) -> None:
        for provider in self._providers.values():
            provider.shutdown()  # flushes what the batch processor still holds


_state: _Tracing | None = None


def enabled() -> bool:
    return _state is not None


def _otel_missing() -> list[str]:
    import importlib.util

    names = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.grpc")
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is absent
            found = False
        if not found:
            missing.append(name)
    return missing


def otel_hint(command: str) -> str | None:
    """The one-line error for `--otel-endpoint` without the `[otel]` extra (None: installed)."""
    missing = _otel_missing()
    if not missing:
        return None
    return (
        f"moshi-grpc {command}: --otel-endpoint needs the [otel] extra (missing: "
        f"{', '.join(missing)}); {OTEL_HINT}"
    )


def setup(endpoint: str, service: str) -> None:
    """Export this process's spans to the OTLP/gRPC collector at `endpoint` (http://host:port:
    plaintext, https://host:port: TLS), batched off the serving path."""
    global _state
    if "://" not in endpoint:
        raise ValueError(
            f"--otel-endpoint {endpoint!r}: give a scheme, http://HOST:4317 (plaintext) or "
            "https://HOST:4317 (TLS)"
        )
    if _otel_missing():
        raise TracingUnavailable(f"--otel-endpoint needs the [otel] extra; {OTEL_HINT}")
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    insecure = endpoint.startswith("http://")

    def processor() -> Any:
        return BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure))

    shutdown()
    _state = _Tracing(processor)
    _state.tracer(service)  # the exporter exists from start-up, not from the first session
    log.info("tracing: exporting %s spans to %s (OTLP/gRPC)", service, endpoint)


def install_exporter(exporter: Any) -> None:
    """Tests: send every service's spans to `exporter` (e.g. the SDK's InMemorySpanExporter)
    as each span ends (a synchronous processor: no flush to wait for, no network)."""
    global _state
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    shutdown()
    _state = _Tracing(lambda: SimpleSpanProcessor(exporter))


def shutdown() -> None:
    """Flush and turn tracing off (idempotent)."""
    global _state
    state, _state = _state, None
    if state is not None:
        state.shutdown()


def setup_from_args(args: Any, service: str) -> None:
    """`--otel-endpoint` of a service's CLI (absent or empty: tracing stays off)."""
    endpoint = getattr(args, "otel_endpoint", None)
    if endpoint:
        setup(endpoint, service)


# --------------------------------------------------------------------------- propagation


def inject(span: Any) -> dict[str, str]:
    """The W3C trace context (`traceparent`, `tracestate`) of `span`, as a carrier dict."""
    from opentelemetry import trace

    carrier: dict[str, str] = {}
    _state.propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def extract(*carriers: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> Any:
    """The parent context of the first carrier that holds a `traceparent` (a dict such as an
    open's `trace_context`, or gRPC metadata pairs); None when none does (a new trace)."""
    for carrier in carriers:
        if not carrier:
            continue
        if not isinstance(carrier, Mapping):
            carrier = {k: v for k, v in carrier if k in _CONTEXT_KEYS and isinstance(v, str)}
        if carrier.get("traceparent"):
            return _state.propagator.extract(dict(carrier))
    return None


def _metadata(context: Any) -> Any:
    try:
        return context.invocation_metadata() if context is not None else None
    except Exception:  # noqa: BLE001 - no metadata to read is no parent
        return None


# --------------------------------------------------------------------------- gateway side


class StreamTrace:
    """A gateway backend stream's span; this base class is the no-op used when tracing is
    off (shared, stateless)."""

    __slots__ = ()

    def metadata(self, base: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        """The stream's call metadata: `base`, plus the trace context on a per-session stream."""
        return base

    def stamp(self, message: Any) -> Any:
        """The `open` message to send: on a mux stream, a copy carrying the trace context."""
        return message

    def end(self) -> None:
        """The stream is over (idempotent)."""


class _StreamSpan(StreamTrace):
    __slots__ = ("span", "carrier", "mux")

    def __init__(self, span: Any, mux: bool) -> None:
        self.span = span
        self.mux = mux
        self.carrier = inject(span)

    def metadata(self, base: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        if self.mux:  # the shared stream is nobody's: the context goes in the open entry
            return base
        return (*base, *self.carrier.items())

    def stamp(self, message: Any) -> Any:
        if not self.mux:
            return message
        out = type(message)()
        out.CopyFrom(message)
        out.trace_context.update(self.carrier)
        return out

    def end(self) -> None:
        if self.span.is_recording():
            self.span.end()


class SessionTrace:
    """The gateway's span of one conversation and its backend streams' spans; this base
    class is the no-op used when tracing is off (shared, stateless)."""

    def stream(self, stage: str, replica: str, mode: str) -> StreamTrace:
        """A span for the session's backend stream of `stage` ("encode", "decode", "step")
        to `replica`; a stage opened again (LM failover) ends its previous span."""
        return _NOOP_STREAM

    def started(self, session: Any) -> None:
        """The session was admitted: record its id, encoding and replicas."""

    def ended(self, summary: Any) -> None:
        """Record the session's summary (outcome, frame counts)."""

    def failed(self, exc: BaseException, context: Any) -> None:
        """Record the status the Converse call ends with because of `exc`."""

    def end(self) -> None:
        """End the session span and any backend stream span still open."""


_NOOP_STREAM = StreamTrace()
NOOP_SESSION = SessionTrace()


class _SessionSpan(SessionTrace):
    def __init__(self, tracer: Any, parent: Any) -> None:
        from opentelemetry.trace import SpanKind

        self._tracer = tracer
        self.span = tracer.start_span("gateway.session", context=parent, kind=SpanKind.SERVER)
        self._streams: dict[str, StreamTrace] = {}
        self._reopened = 0  # streams opened again (LM failovers)
        self._code = grpc.StatusCode.OK

    def stream(self, stage: str, replica: str, mode: str) -> StreamTrace:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        previous = self._streams.pop(stage, None)
        if previous is not None:
            previous.end()
            self._reopened += 1
        span = self._tracer.start_span(
            f"gateway.{stage}",
            context=trace.set_span_in_context(self.span),
            kind=SpanKind.CLIENT,
            attributes={"moshi.replica": replica, "moshi.backend_streams": mode},
        )
        out = self._streams[stage] = _StreamSpan(span, mode == "mux")
        return out

    def started(self, session: Any) -> None:
        params = session.params
        lease = session.lease
        self.span.set_attributes(
            {
                "moshi.session_id": session.session_id,
                "moshi.encoding": str(params.encoding),
                "moshi.sample_rate": int(params.sample_rate),
                "moshi.budget_ms": int(params.budget_ms),
                **{f"moshi.{k}_replica": r.address for k, r in lease.replicas.items()},
            }
        )

    def ended(self, summary: Any) -> None:
        self.span.set_attributes(
            {
                "moshi.outcome": summary.reason,
                "moshi.frames_in": int(summary.frames_in),
                "moshi.frames_out": int(summary.frames_out),
                "moshi.frames_late": int(summary.frames_late),
                "moshi.frames_dropped": int(summary.frames_dropped),
                "moshi.failovers": self._reopened,
            }
        )

    def failed(self, exc: BaseException, context: Any) -> None:
        import asyncio

        from moshi_grpc.services.common.status import status_for

        if isinstance(exc, asyncio.CancelledError):
            self._code = grpc.StatusCode.CANCELLED
            return
        if isinstance(exc, grpc.aio.AbortError):  # context.abort(): the code it set
            code = context.code() if context is not None else None
            self._code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
            message = context.details() if context is not None else ""
        else:
            self._code, message = status_for(exc)
        self.span.set_attribute("moshi.error", str(message or exc))

    def end(self) -> None:
        from opentelemetry.trace import Status, StatusCode

        for stream in self._streams.values():
            stream.end()
        self._streams.clear()
        if not self.span.is_recording():
            return
        code = self._code
        self.span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            self.span.set_status(Status(StatusCode.ERROR, code.name))
        self.span.end()


def gateway_session(context: Any) -> SessionTrace:
    """The span of one Converse stream (the no-op `NOOP_SESSION` when tracing is off)."""
    state = _state
    if state is None:
        return NOOP_SESSION
    return _SessionSpan(state.tracer("gateway"), extract(_metadata(context)))


# --------------------------------------------------------------------------- backend side


def traced_open(stage: Any, message: Any, context: Any = None) -> Any:
    """`stage.open(message)` (services/common/mux.py) inside a span for the backend session,
    parented by the caller's context (the open's `trace_context`, else the stream's
    metadata: pass the per-session RPC's `context`). The span ends when the session's slot
    is freed (`Opened.close`), or at once when the open is refused."""
    state = _state
    if state is None:
        return stage.open(message)
    from opentelemetry.trace import SpanKind, Status, StatusCode

    service, name = _BACKEND_SPANS.get(stage.what, ("backend", stage.what.lower()))
    parent = extract(getattr(message, "trace_context", None), _metadata(context))
    span = state.tracer(service).start_span(
        name,
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"moshi.session_id": message.session_id, "moshi.mux": context is None},
    )
    try:
        opened = stage.open(message)
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        span.end()
        raise
    if opened.history_len:
        span.set_attribute("moshi.replay_steps", opened.history_len)
    close = opened.close

    def close_and_end() -> None:
        close()
        if span.is_recording():
            span.end()

    opened.close = close_and_end
    return opened
