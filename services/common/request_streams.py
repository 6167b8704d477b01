"""Request-stream helpers shared by the streaming servicers: idle timeout, the
`open`-then-`frame`s protocol, and rejection of messages from a newer contract version."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf import unknown_fields
from google.protobuf.message import Message

from moshi_grpc.services.common.errors import IdleTimeout, InvalidInput, OutOfOrder

_timeout = getattr(asyncio, "timeout", None)


async def next_message(requests: AsyncIterator[Any], idle_timeout_s: float | None) -> Any | None:
    """The next request, None at end of stream; IdleTimeout when none came in time."""
    try:
        if idle_timeout_s and idle_timeout_s > 0:
            if _timeout is not None:  # Python 3.11+: a timer, no extra task per message
                async with _timeout(idle_timeout_s):
                    return await requests.__anext__()
            return await asyncio.wait_for(requests.__anext__(), timeout=idle_timeout_s)
        return await requests.__anext__()
    except StopAsyncIteration:
        return None
    except asyncio.TimeoutError:
        raise IdleTimeout(
            f"no message for {idle_timeout_s:g} s (idle timeout); stream closed"
        ) from None


def check_known_fields(message: Message, what: str) -> None:
    """Refuse fields this server does not know: a newer client's setting must not be
    silently ignored (e.g. a new sampling parameter)."""
    if len(unknown_fields.UnknownFieldSet(message)):
        raise InvalidInput(
            f"{what} has fields this server does not know (client uses a newer contract "
            "version?); upgrade the server or drop those fields"
        )


def kind_of(message: Message, what: str) -> str:
    """Which member of the request's `kind` oneof is set (InvalidInput when none)."""
    kind = message.WhichOneof("kind")
    if kind is None:
        check_known_fields(message, what)
        raise InvalidInput(f"{what} sets neither `open` nor `frame`")
    return kind


async def read_open(
    requests: AsyncIterator[Any], idle_timeout_s: float | None, what: str
) -> Any | None:
    """The stream's first message, which must be `open`; returns its `open` (None if the
    client closed without sending anything)."""
    first = await next_message(requests, idle_timeout_s)
    if first is None:
        return None
    kind = kind_of(first, what)
    if kind != "open":
        raise OutOfOrder(f"first message of the {what} stream must be `open`, got `{kind}`")
    check_known_fields(first.open, f"{what}.open")
    return first.open


def expect_frame(message: Any, expected_index: int, what: str) -> Any:
    """The `frame` of a request after the open; OutOfOrder for a second open or a gap."""
    kind = kind_of(message, what)
    if kind == "open":
        raise OutOfOrder(f"second `open` on the {what} stream (only the first message opens)")
    frame = message.frame
    check_index(frame.index, expected_index)
    return frame


def check_index(index: int, expected_index: int) -> None:
    """OutOfOrder unless a frame's index is the expected one (no gap, no repeat)."""
    if index != expected_index:
        raise OutOfOrder(
            f"frame index {index} out of order: expected {expected_index} "
            "(indices start at 0 and increase by one)"
        )


def stream_closer(slot: Any, metrics: Any | None) -> Callable[[], None]:
    """Counts the stream as active and returns an idempotent close() that frees its slot.

    Call close() from the handler's `finally` AND from `context.add_done_callback`: the
    latter still runs when `stop(grace)` cancels a handler whose `finally` never runs
    (grpc/grpc#37239)."""
    if metrics is not None:
        metrics.streams_active.inc()
    done = False

    def close() -> None:
        nonlocal done
        if done:
            return
        done = True
        slot.release()
        if metrics is not None:
            metrics.streams_active.dec()

    return close
