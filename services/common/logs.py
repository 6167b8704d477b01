"""Structured logs that carry the session id and RPC of the stream that logged them.

Each gRPC stream runs in its own asyncio task, so a `contextvars.ContextVar` set by the
handler (`bind_session(...)`) tags every record that the stream logs, without passing ids
around. `install()` adds the filter (and optionally a JSON formatter) to the root handlers.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time

session_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("session_id", default="-")
rpc_var: contextvars.ContextVar[str] = contextvars.ContextVar("rpc", default="-")


def bind_session(session_id: str) -> None:
    """Tag the current stream's log records with `session_id` (empty -> '-')."""
    session_id_var.set(session_id or "-")


def bind_rpc(method: str) -> None:
    rpc_var.set(method)


class ContextFilter(logging.Filter):
    """Adds `session_id` and `rpc` attributes to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.session_id = session_id_var.get()
        record.rpc = rpc_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, session_id, rpc (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "session_id": getattr(record, "session_id", "-"),
            "rpc": getattr(record, "rpc", "-"),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [session=%(session_id)s rpc=%(rpc)s] %(message)s"


def install(json_logs: bool = False) -> None:
    """Attach the context filter (and a formatter) to the root logger's handlers."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO)
    for handler in root.handlers:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
        handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter(TEXT_FORMAT))
