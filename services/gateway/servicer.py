"""The public `Gateway` servicer: session admission, then one `Session` per Converse stream.

Thin on purpose: validate the first message (a persona too: persona.py), pick replicas
(admission, by the model the session needs), open the backend streams (after the pipeline's
start steps; a persona's prompt is in the LM when they return), send `SessionStarted`, hand
over to `Session.pump()`, and always end with a `SessionEnded` summary before the status the
gateway chose. Refusals for load carry a retry hint both in the message and as trailing
metadata `retry-after-ms`. `Info` says what the gateway offers (voices, persona model).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

import grpc

from moshi_grpc import __version__
from moshi_grpc.services.common import logs, tracing
from moshi_grpc.services.common.errors import (
    BackendUnavailable,
    CapacityExhausted,
    ErrorCode,
    InvalidInput,
    OutOfOrder,
    ServiceError,
)
from moshi_grpc.services.common.metrics import GatewayMetrics
from moshi_grpc.services.common.request_streams import check_known_fields
from moshi_grpc.services.common.server import ServerState
from moshi_grpc.services.common.status import grpc_status
from moshi_grpc.services.common.tracing import SessionTrace
from moshi_grpc.services.gateway import persona, replies
from moshi_grpc.services.gateway.admission import Admission, NoCapacity, NoModel
from moshi_grpc.services.gateway.config import GatewaySettings, session_params
from moshi_grpc.services.gateway.persona import Personas
from moshi_grpc.services.gateway.session import Session
from moshi_grpc.services.gateway.streams import RetryableCapacity
from moshi_grpc.services.gateway.voices import VoiceDirectory
from moshi_grpc.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-ms"


def client_key(client_id: str, peer: str | None) -> str:
    """Who a session belongs to, for the per-client session limit: its `client_id` when set,
    else the peer's address without the port (e.g. "ipv4:127.0.0.1")."""
    if client_id:
        return f"id:{client_id}"
    peer = peer or "unknown"
    if peer.startswith(("ipv4:", "ipv6:")):
        peer = peer.rsplit(":", 1)[0]
    return peer


@dataclass(eq=False)
class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Converse: one conversation per stream, pinned to one replica per backend of the
    pipeline that `admission` places sessions for."""

    admission: Admission
    settings: GatewaySettings
    metrics: GatewayMetrics
    state: ServerState | None = None  # the server's (draining: refuse new sessions)
    personas: Personas | None = None  # voices and limits of persona sessions (None: no voices)
    sessions: dict[str, Session] = field(default_factory=dict)  # live, by session id
    _client_sessions: dict[str, int] = field(default_factory=dict)  # live, by client key

    def __post_init__(self) -> None:
        if self.personas is None:
            self.personas = Personas.of(self.settings, self.metrics, VoiceDirectory())

    async def Info(self, request, context: grpc.aio.ServicerContext) -> gateway_pb2.GatewayInfo:
        lm = self.admission.pool.sets.get(persona.PERSONA_BACKEND)
        infos = [] if lm is None else [r.info for r in lm.replicas.values() if r.healthy and r.info]
        return gateway_pb2.GatewayInfo(
            voices=self.personas.voices.info(),
            persona=persona.persona_served(infos),
            version=__version__,
        )

    async def _refuse(
        self, context: grpc.aio.ServicerContext, reason: str, exc: BaseException, retry_ms: int
    ) -> None:
        self.metrics.sessions_refused.labels(reason).inc()
        code = (
            grpc_status(exc.code)
            if isinstance(exc, ServiceError)
            else grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        message = f"{exc}; retry after {retry_ms} ms"
        log.info("session refused (%s): %s", reason, message)
        await context.abort(code, message, trailing_metadata=((RETRY_AFTER_KEY, str(retry_ms)),))

    async def Converse(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        trace = tracing.gateway_session(context)  # the no-op when tracing is off
        try:
            await self._converse(context, trace)
        except BaseException as exc:
            trace.failed(exc, context)
            raise
        finally:
            trace.end()

    async def _converse(self, context: grpc.aio.ServicerContext, trace: SessionTrace) -> None:
        first = await context.read()
        if first is grpc.aio.EOF:
            self.metrics.sessions_refused.labels("invalid").inc()
            raise InvalidInput("stream closed before SessionConfig")
        try:
            kind = first.WhichOneof("kind")
            if kind != "config":
                raise OutOfOrder("the first ConverseRequest must be a SessionConfig")
            check_known_fields(first.config, "SessionConfig")
            check_known_fields(first.config.sampling, "SamplingParams")
            params = session_params(first.config, self.settings)
            if first.config.HasField("persona"):
                check_known_fields(first.config.persona, "Persona")
                params.persona = await self.personas.resolve(first.config.persona)
        except ValueError:  # NotFound (an unknown voice) too
            self.metrics.sessions_refused.labels("invalid").inc()
            raise
        if self.state is not None and self.state.draining:
            self.metrics.sessions_refused.labels("draining").inc()
            raise BackendUnavailable("gateway is draining; retry on another replica")
        client = client_key(params.client_id, context.peer())
        limit = self.settings.max_sessions_per_client
        if limit > 0 and self._client_sessions.get(client, 0) >= limit:
            retry_ms = self.settings.retry_after_ms
            exc = CapacityExhausted(
                f"client {client!r} already has {limit} live session(s), the most allowed per "
                "client; end one first"
            )
            await self._refuse(context, "per_client", exc, retry_ms)
            return
        admission = self.admission
        needs = {persona.PERSONA_BACKEND: persona.lm_need(params.persona is not None)}
        try:
            lease = admission.lease(params.budget_ms, needs)
        except NoModel as exc:  # retrying cannot help: no retry hint
            self.metrics.sessions_refused.labels(exc.reason).inc()
            log.info("session refused (%s): %s", exc.reason, exc)
            raise
        except NoCapacity as exc:
            await self._refuse(context, exc.reason, exc, exc.retry_after_ms)
            return
        if lease.estimate is not None:
            self.metrics.admission_estimate_seconds.observe(lease.estimate.total_ms / 1000.0)
        session_id = uuid.uuid4().hex[:16]
        logs.bind_session(session_id)
        session = Session(
            session_id=session_id,
            params=params,
            lease=lease,
            admission=admission,
            settings=self.settings,
            metrics=self.metrics,
            context=context,
            metadata=admission.pool.channels.metadata(),
            trace=trace,
        )
        trace.started(session)
        self._client_sessions[client] = self._client_sessions.get(client, 0) + 1
        # A vanished client cancels this handler; free the backend slots right away even if
        # the handler's `finally` runs late (grpc/grpc#37239).
        context.add_done_callback(lambda _ctx: session.cancel_backends())
        started = False
        try:
            try:
                await session.open_backends()
            except RetryableCapacity as exc:
                await self._refuse(context, "capacity", exc, exc.retry_after_ms)
                return
            except BackendUnavailable:
                self.metrics.sessions_refused.labels("backend_unavailable").inc()
                raise
            except ServiceError as exc:  # the persona refused by the LM, its prompt too slow
                self.metrics.sessions_refused.labels(_refusal_reason(exc)).inc()
                raise
            started = True
            self.sessions[session_id] = session
            self.metrics.sessions_started.inc()
            self.metrics.sessions_active.inc()
            persona.count_started(params.persona)
            await context.write(
                replies.started(
                    session_id, params, lease, admission.pipeline, persona.started(params.persona)
                )
            )
            log.info(
                "session started: %d Hz %s, budget %d ms, %s, client %r",
                params.sample_rate,
                params.encoding,
                params.budget_ms,
                ", ".join(f"{k} {r.address}" for k, r in lease.replicas.items()),
                params.client_id,
            )
            try:
                await session.pump()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Error ending: no reply after the summary, and none cut in half by it.
                if await session.writer.quiesce(self.settings.summary_wait_s):
                    await self._end(session, context)
                else:
                    log.warning("client not reading: ending without the summary")
                if isinstance(exc, RetryableCapacity):
                    await context.abort(
                        grpc_status(exc.code),
                        f"{exc}; retry after {exc.retry_after_ms} ms",
                        trailing_metadata=((RETRY_AFTER_KEY, str(exc.retry_after_ms)),),
                    )
                raise
            await self._end(session, context)
            await session.finish()
        finally:
            self.sessions.pop(session_id, None)
            left = self._client_sessions.get(client, 1) - 1
            if left > 0:
                self._client_sessions[client] = left
            else:
                self._client_sessions.pop(client, None)
            await session.close()
            lease.release()
            if started:
                self.metrics.sessions_active.dec()
                self.metrics.sessions_ended.labels(session.ending.reason.value).inc()
                summary = session.summary()
                trace.ended(summary)
                if session.audio_duration_s() > 0:
                    self.metrics.session_wall_audio_ratio.observe(
                        summary.duration_s / session.audio_duration_s()
                    )
                log.info(
                    "session ended (%s): frames in %d out %d late %d dropped %d, "
                    "latency p50 %.1f p99 %.1f ms, %.1f s",
                    summary.reason,
                    summary.frames_in,
                    summary.frames_out,
                    summary.frames_late,
                    summary.frames_dropped,
                    summary.latency_p50_ms,
                    summary.latency_p99_ms,
                    summary.duration_s,
                )

    async def _end(self, session: Session, context: grpc.aio.ServicerContext) -> None:
        """Send the SessionEnded summary (best effort: the client may be gone)."""
        try:
            await context.write(replies.ended(session.summary()))
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the client is gone; nothing else to tell it
            log.debug("could not send the summary", exc_info=True)


def _refusal_reason(exc: ServiceError) -> str:
    """The refusal metric's reason for a session refused while it opened its backends: its
    persona refused by the LM (invalid, wrong_model), or the LM too slow to apply it."""
    if exc.code is ErrorCode.WRONG_MODEL:
        return NoModel.reason
    if exc.code in (ErrorCode.INVALID_INPUT, ErrorCode.NOT_FOUND):
        return "invalid"
    return "backend_unavailable"
