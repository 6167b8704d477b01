"""The interceptors every server gets (`server.py` installs them).

- `ServingInterceptor`: admission (new streams get UNAVAILABLE while loading or draining),
  domain-exception -> status mapping (`status.py`), the standard `grpc_server_*` metrics,
  in-flight stream accounting for the drain, and the RPC name in the log context.
- `AuthInterceptor`: bearer-token auth, health exempt so that probes work.

`asyncio.CancelledError` is never swallowed (grpc/grpc#43360).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import grpc

from moshi_grpc.services.common import logs
from moshi_grpc.services.common.metrics import RpcMetrics
from moshi_grpc.services.common.status import status_code, status_for

if TYPE_CHECKING:
    from moshi_grpc.services.common.server import ServerState

log = logging.getLogger(__name__)

# What an interceptor calls for the handler of an RPC.
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
UNAUTHENTICATED_MESSAGE = "missing or invalid credentials"


def _is_exempt(method: str) -> bool:
    """Health and reflection: never refused by drain/loading, not counted as live streams."""
    return method.startswith(HEALTH_PREFIX) or method.startswith(REFLECTION_PREFIXES)


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


_FACTORIES = {
    "unary": ("unary_unary", grpc.unary_unary_rpc_method_handler),
    "client_stream": ("stream_unary", grpc.stream_unary_rpc_method_handler),
    "server_stream": ("unary_stream", grpc.unary_stream_rpc_method_handler),
    "bidi_stream": ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


class _Malformed:
    """A unary request whose bytes did not parse. grpc answers UNKNOWN when a unary
    deserializer raises, before any interceptor runs; parsing leniently and raising inside
    the handler lets the error mapping answer INVALID_ARGUMENT like it does for streams."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    if deserializer is None or getattr(deserializer, "_lenient", False):
        return deserializer

    def parse(data: bytes) -> object:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - re-raised inside the handler
            return _Malformed(exc)

    parse._lenient = True  # type: ignore[attr-defined]
    return parse


def _replace_behavior(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    attr, factory = _FACTORIES[_rpc_type(handler)]
    deserializer = handler.request_deserializer
    if not handler.request_streaming:
        deserializer = _lenient(deserializer)
    return factory(
        behavior,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )


def _code_name(code: object) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return status_code(code).name
    return "UNKNOWN"


class _HandlerInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that wraps the handler of each RPC that has one (`wrap`)."""

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self.wrap(handler, handler_call_details)

    def wrap(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        raise NotImplementedError


class AuthInterceptor(_HandlerInterceptor):
    """Bearer-token auth: `authorization: Bearer <token>` compared in constant time.

    Health checks are exempt so that load balancers and kubelet probes work without it.
    The refusal never says whether the header was missing or the token was wrong.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("auth token must not be empty")
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        provided = b""
        for key, value in metadata or ():
            if key.lower() == "authorization":
                provided = value if isinstance(value, bytes) else value.encode()
                break
        return hmac.compare_digest(provided, self._expected)

    def wrap(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(HEALTH_PREFIX) or self._authorized(
            details.invocation_metadata
        ):
            return handler

        async def reject(_request, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

        return _replace_behavior(handler, reject)


class ServingInterceptor(_HandlerInterceptor):
    """Admission, error mapping, RPC metrics, in-flight accounting, log context."""

    def __init__(self, state: ServerState, metrics: RpcMetrics) -> None:
        self._state = state
        self._metrics = metrics

    def wrap(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        method = details.method
        service, _, name = method.lstrip("/").rpartition("/")
        rpc_type = _rpc_type(handler)
        attr, _factory = _FACTORIES[rpc_type]
        behavior = getattr(handler, attr)
        exempt = _is_exempt(method)
        state = self._state
        metrics = self._metrics
        labels = (service, name, rpc_type)

        def admit() -> str | None:
            """Refusal message for a new stream, or None to admit it."""
            if exempt or not handler.request_streaming:
                return None
            if state.draining:
                return "server is draining (shutting down); retry on another replica"
            if not state.ready:
                return "server is still loading its model; retry shortly"
            return None

        def begin() -> float:
            metrics.started.labels(*labels).inc()
            if not exempt:
                state.enter()
            logs.bind_rpc(name)
            return time.perf_counter()

        def end(t0: float, code: str) -> None:
            if not exempt:
                state.leave()
            metrics.handled.labels(*labels, code).inc()
            metrics.handling_seconds.labels(*labels).observe(time.perf_counter() - t0)

        async def fail(
            context: grpc.aio.ServicerContext, exc: BaseException
        ) -> tuple[grpc.StatusCode, str]:
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method)
            else:
                log.info("%s -> %s: %s", method, code.name, message)
            return code, message

        @contextlib.asynccontextmanager
        async def accounted(request, context: grpc.aio.ServicerContext):
            """Admission, error mapping and RPC metrics around one call: one body for the
            unary and the streaming wrappers, so a rule added here holds for both."""
            t0 = begin()
            code = "OK"
            try:
                refusal = admit()
                if refusal is not None:
                    code = "UNAVAILABLE"
                    await context.abort(grpc.StatusCode.UNAVAILABLE, refusal)
                if isinstance(request, _Malformed):
                    raise request.error
                yield
                code = _code_name(context.code()) if context.code() is not None else "OK"
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except grpc.aio.AbortError:
                code = _code_name(context.code())
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
                status, message = await fail(context, exc)
                code = status.name
                await context.abort(status, message)
            finally:
                end(t0, code)

        if inspect.isasyncgenfunction(behavior):

            async def wrapped_gen(request, context: grpc.aio.ServicerContext):
                async with accounted(request, context):
                    async for response in behavior(request, context):
                        yield response

            return _replace_behavior(handler, wrapped_gen)

        async def wrapped(request, context: grpc.aio.ServicerContext):
            async with accounted(request, context):
                return await behavior(request, context)

        return _replace_behavior(handler, wrapped)
