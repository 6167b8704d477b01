"""Domain errors -> gRPC status, made once for every service (the serving layer).

`status_for` is what the serving interceptor (`interceptors.py`), the multiplexed streams
(`mux.py`) and the gateway answer for an exception. Besides the domain errors
(`errors.py`): any other `ValueError` and a protobuf `DecodeError` (bytes that are not the
request message) are INVALID_ARGUMENT, `NotImplementedError` is UNIMPLEMENTED, anything else
INTERNAL with a message that names only the exception type.

`asyncio.CancelledError` is never mapped: it must propagate (grpc/grpc#43360).
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from moshi_grpc.services.common.errors import ErrorCode, ServiceError

GRPC_STATUS: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.OUT_OF_ORDER: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.NO_CAPACITY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.TIMED_OUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.UNSUPPORTED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorCode.REFUSED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.WRONG_MODEL: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}

_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def grpc_status(code: ErrorCode) -> grpc.StatusCode:
    """The gRPC status a domain error code is answered with."""
    return GRPC_STATUS[code]


def status_code(number: int) -> grpc.StatusCode:
    """The StatusCode for a status number carried in a message (e.g. `MuxEnd.code`);
    UNKNOWN for a number gRPC does not define."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message to answer for `exc`."""
    if isinstance(exc, ServiceError):
        return grpc_status(exc.code), str(exc) or type(exc).__name__
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc) or "invalid argument"
    if isinstance(exc, DecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"malformed protobuf message: {exc}"
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc) or "not implemented"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"
