"""Domain exceptions and their gRPC status codes, in one place.

Engines and servicers raise these; the serving interceptor (`server.py`) turns them into a
status with the exception's message, so every service answers the same error the same way
(statuses as documented in protos/moshi_grpc/v1/common.proto):

| exception | status |
| --- | --- |
| `OutOfOrder` | FAILED_PRECONDITION (frame before open, second open, wrong frame index) |
| `InvalidInput`, any other `ValueError` | INVALID_ARGUMENT |
| `CapacityExhausted` | RESOURCE_EXHAUSTED (no free slot: retry later with backoff) |
| `Draining`, `NotReady`, `BackendUnavailable` | UNAVAILABLE (retry elsewhere / later) |
| `IdleTimeout`, `BudgetExceeded` | DEADLINE_EXCEEDED |
| `Unauthenticated` | UNAUTHENTICATED |
| `NotImplementedFeature` | UNIMPLEMENTED |
| protobuf `DecodeError` (bytes that are not the request message) | INVALID_ARGUMENT |
| anything else | INTERNAL (the message names only the exception type) |

`asyncio.CancelledError` is never mapped: it must propagate (grpc/grpc#43360).
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The StatusCode for a status number carried in a message (e.g. `MuxEnd.code`);
    UNKNOWN for a number gRPC does not define."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


class ServiceError(Exception):
    """Base of the domain errors; `code` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(ServiceError, ValueError):
    """Malformed input: wrong length, NaN/Inf samples, codes out of range, bad parameters."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class OutOfOrder(ServiceError, ValueError):
    """A message that is valid on its own but not at this point of the stream."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class CapacityExhausted(ServiceError):
    """No free batch slot (or no replica with one): refuse instead of queueing silently."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Draining(ServiceError):
    """The replica is shutting down and admits no new streams."""

    code = grpc.StatusCode.UNAVAILABLE


class NotReady(ServiceError):
    """The replica is still loading its model."""

    code = grpc.StatusCode.UNAVAILABLE


class BackendUnavailable(ServiceError):
    """A backend the gateway depends on failed or is unreachable."""

    code = grpc.StatusCode.UNAVAILABLE


class IdleTimeout(ServiceError):
    """No message arrived on a stream for longer than the idle timeout."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class BudgetExceeded(ServiceError):
    """A session kept missing its per-frame latency budget."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ServiceError):
    """Missing or wrong credentials (the message never says which part failed)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class NotImplementedFeature(ServiceError):
    """A valid request for a feature this replica does not support."""

    code = grpc.StatusCode.UNIMPLEMENTED


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message to answer for `exc`."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc) or type(exc).__name__
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc) or "invalid argument"
    if isinstance(exc, DecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"malformed protobuf message: {exc}"
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc) or "not implemented"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"
