"""Domain exceptions, each with a domain code of our own (`ErrorCode`).

Engines and servicers raise these. They know nothing of gRPC: the serving layer turns the
code into a status, in one place (`status.py`), so every service answers the same error the
same way (statuses as documented in protos/moshi_grpc/v1/common.proto):

| exception | code | gRPC status |
| --- | --- | --- |
| `InvalidInput`, any other `ValueError` | INVALID_INPUT | INVALID_ARGUMENT |
| `OutOfOrder` | OUT_OF_ORDER | FAILED_PRECONDITION (frame before open, second open, ...) |
| `CapacityExhausted` | NO_CAPACITY | RESOURCE_EXHAUSTED (no free slot: retry with backoff) |
| `Draining`, `NotReady`, `BackendUnavailable` | UNAVAILABLE | UNAVAILABLE (retry elsewhere) |
| `IdleTimeout`, `BudgetExceeded` | TIMED_OUT | DEADLINE_EXCEEDED |
| `Unauthenticated` | UNAUTHENTICATED | UNAUTHENTICATED |
| `NotImplementedFeature` | UNSUPPORTED | UNIMPLEMENTED |
| `NotFound` | NOT_FOUND | NOT_FOUND (e.g. an unknown voice name) |
| `WrongModel` | WRONG_MODEL | FAILED_PRECONDITION (a persona for a model without one, ...) |
| `TextPolicyEnded` (gateway/text_policy.py) | REFUSED | PERMISSION_DENIED (a policy ended it) |
| anything else | INTERNAL | INTERNAL (the message names only the exception type) |
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    """What kind of failure a domain error is; `status.py` maps each to a gRPC status."""

    INVALID_INPUT = "invalid_input"
    OUT_OF_ORDER = "out_of_order"
    NO_CAPACITY = "no_capacity"
    UNAVAILABLE = "unavailable"
    TIMED_OUT = "timed_out"
    UNAUTHENTICATED = "unauthenticated"
    UNSUPPORTED = "unsupported"
    REFUSED = "refused"  # a policy declines to go on (the gateway's text safety hook)
    NOT_FOUND = "not_found"
    WRONG_MODEL = "wrong_model"  # valid, but not for the model this replica serves
    INTERNAL = "internal"


class ServiceError(Exception):
    """Base of the domain errors; `code` says what kind of failure it is."""

    code: ErrorCode = ErrorCode.INTERNAL


class InvalidInput(ServiceError, ValueError):
    """Malformed input: wrong length, NaN/Inf samples, codes out of range, bad parameters."""

    code = ErrorCode.INVALID_INPUT


class OutOfOrder(ServiceError, ValueError):
    """A message that is valid on its own but not at this point of the stream."""

    code = ErrorCode.OUT_OF_ORDER


class CapacityExhausted(ServiceError):
    """No free batch slot (or no replica with one): refuse instead of queueing silently."""

    code = ErrorCode.NO_CAPACITY


class Unavailable(ServiceError):
    """Transient: the caller may retry, elsewhere or after a while (UNAVAILABLE)."""

    code = ErrorCode.UNAVAILABLE


class Draining(Unavailable):
    """The replica is shutting down and admits no new streams."""


class NotReady(Unavailable):
    """The replica is still loading its model."""


class BackendUnavailable(Unavailable):
    """A backend the gateway depends on failed or is unreachable."""


class TimedOut(ServiceError):
    """A stream or session ran out of time (DEADLINE_EXCEEDED)."""

    code = ErrorCode.TIMED_OUT


class IdleTimeout(TimedOut):
    """No message arrived on a stream for longer than the idle timeout."""


class BudgetExceeded(TimedOut):
    """A session kept missing its per-frame latency budget."""


class Unauthenticated(ServiceError):
    """Missing or wrong credentials (the message never says which part failed)."""

    code = ErrorCode.UNAUTHENTICATED


class NotImplementedFeature(ServiceError):
    """A valid request for a feature this replica does not support."""

    code = ErrorCode.UNSUPPORTED


class NotFound(ServiceError, ValueError):
    """A name the caller gave does not exist here (a voice that is not in the directory)."""

    code = ErrorCode.NOT_FOUND


class WrongModel(ServiceError, ValueError):
    """A valid request the served model cannot take: a persona for a model that has none,
    or a session without one on a persona model."""

    code = ErrorCode.WRONG_MODEL
