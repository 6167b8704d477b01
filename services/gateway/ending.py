"""How a session ends: one vocabulary of end reasons, and the first cause that wins.

`EndReason` values are the public summary strings (`SessionSummary.reason`, the client
contract in protos/) and, unchanged, the `reason` label of
`moshi_gateway_sessions_ended_total`: one name per way a session ends.

Whatever can end a session reports it to the session's `Ending`: the session's own rules
(the client closed its stream, K misses in a row, the idle timeout, the maximum length) and
the failures its links and hooks raise (a backend failed or stalled, the text policy). The
first report wins; `reason_for` maps a failure to its reason, in this one place.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from moshi_grpc.services.common.errors import (
    BackendUnavailable,
    BudgetExceeded,
    CapacityExhausted,
    ErrorCode,
    IdleTimeout,
    ServiceError,
)
from moshi_grpc.services.gateway.text_policy import TextPolicyEnded


class EndReason(str, Enum):
    """Why a session ended (the summary's `reason` and the metric label)."""

    CLIENT_CLOSED = "client_closed"  # the client ended its input; every frame answered
    DEADLINE_EXCEEDED = "deadline_exceeded"  # K misses in a row, or a stage stalled
    BACKEND_FAILED = "backend_failed"  # a backend replica failed (or refused) mid-session
    CANCELLED = "cancelled"  # the client went away (or the gateway stopped)
    IDLE_TIMEOUT = "idle_timeout"  # no audio from the client for the idle timeout
    MAX_SESSION_LENGTH = "max_session_length"  # the gateway's maximum session length
    TEXT_POLICY = "text_policy"  # the text safety hook's `end` action
    ERROR = "error"  # anything else (bad input mid-session, a bug)


class StageStalled(ServiceError):
    """A backend stage stopped answering for K frames' time (its replica still looks
    healthy, or the session could not move): the session cannot keep its budget."""

    code = ErrorCode.TIMED_OUT


class MaxSessionLength(ServiceError):
    """The session reached the gateway's maximum session length."""

    code = ErrorCode.TIMED_OUT


def reason_for(exc: BaseException) -> EndReason:
    """The end reason of a session ended by `exc`."""
    if isinstance(exc, StageStalled | BudgetExceeded):
        return EndReason.DEADLINE_EXCEEDED
    if isinstance(exc, TextPolicyEnded):
        return EndReason.TEXT_POLICY
    if isinstance(exc, BackendUnavailable | CapacityExhausted):
        return EndReason.BACKEND_FAILED
    if isinstance(exc, IdleTimeout):
        return EndReason.IDLE_TIMEOUT
    if isinstance(exc, MaxSessionLength):
        return EndReason.MAX_SESSION_LENGTH
    return EndReason.ERROR


class Ending:
    """One session's end: `fail()` records the first failure (and wakes the session's
    loop); the loop then ends with `end(exc)` or `complete()`, which fix the reason. Until
    then the reason is CANCELLED: a session whose handler is cancelled never gets there."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self.failure: BaseException | None = None
        self.reason = EndReason.CANCELLED

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self._wake()

    def end(self, exc: BaseException) -> BaseException:
        """The session ends with `exc` (returned, to be raised)."""
        self.reason = reason_for(exc)
        return exc

    def complete(self) -> None:
        """The client ended its input and every frame was answered."""
        self.reason = EndReason.CLIENT_CLOSED
